//! A plain text table: left-aligned first column, the others right-aligned, widths from content.

/// Rows of cells under a header. A section title spans the table; a note's text spans every
/// column after the first and does not widen them.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Row>,
}

#[derive(Debug)]
enum Row {
    Cells(Vec<String>),
    Section(String),
    Note(String, String),
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Row::Cells(cells));
    }

    pub fn section(&mut self, title: impl Into<String>) {
        self.rows.push(Row::Section(title.into()));
    }

    pub fn note(&mut self, label: impl Into<String>, text: impl Into<String>) {
        self.rows.push(Row::Note(label.into(), text.into()));
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            match row {
                Row::Cells(cells) => {
                    for (i, cell) in cells.iter().enumerate().take(columns) {
                        widths[i] = widths[i].max(cell.chars().count());
                    }
                }
                Row::Note(label, _) => widths[0] = widths[0].max(label.chars().count()),
                Row::Section(_) => {}
            }
        }
        let line = |cells: &[String]| -> String {
            let mut out = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = width - cell.chars().count().min(*width);
                if i == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("  ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(&self.header);
        let total: usize = widths.iter().sum::<usize>() + 2 * (columns - 1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for row in &self.rows {
            match row {
                Row::Cells(cells) => out.push_str(&line(cells)),
                Row::Section(title) => {
                    out.push_str(title);
                    out.push('\n');
                }
                Row::Note(label, text) => {
                    let pad = widths[0] - label.chars().count();
                    out.push_str(&format!("{label}{}  {text}\n", " ".repeat(pad)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut table = Table::new(&["figure", "berthd", "ratio"]);
        table.section("C=1");
        table.row(vec!["create /s".into(), "31.5".into(), "0.97".into()]);
        table.row(vec!["exit p99 ms".into(), "1234.0".into(), String::new()]);
        table.note("stats", "skipped: a reason longer than any column");
        assert_eq!(
            table.render(),
            "\
figure       berthd  ratio
--------------------------
C=1
create /s      31.5   0.97
exit p99 ms  1234.0
stats        skipped: a reason longer than any column
"
        );
    }
}
