//! A plain text table: left-aligned first column, the others right-aligned, widths from content.

/// Rows of cells under a header; a row of one cell is a section title spanning the table.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn section(&mut self, title: impl Into<String>) {
        self.rows.push(vec![title.into()]);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in self.rows.iter().filter(|r| r.len() > 1) {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
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
            if row.len() == 1 {
                out.push_str(&row[0]);
                out.push('\n');
            } else {
                out.push_str(&line(row));
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
        assert_eq!(
            table.render(),
            "\
figure       berthd  ratio
--------------------------
C=1
create /s      31.5   0.97
exit p99 ms  1234.0
"
        );
    }
}
