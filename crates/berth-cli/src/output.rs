//! What berth prints: tables, JSON in the proto3 mapping, event lines, sizes and times.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_api::proto::{Checkpoint, Container, Event, Machine, Process, StateResponse, User};
use serde_json::{Value, json};

use crate::error::{Error, io_error};

pub fn write_stdout(text: &str) -> Result<(), Error> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Err(Error::StdoutClosed),
        result => result.map_err(io_error("writing to stdout")),
    }
}

pub fn print_json_pretty(value: &Value) -> Result<(), Error> {
    // Serializing a Value cannot fail: its map keys are strings.
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    write_stdout(&format!("{text}\n"))
}

/// Aligns `rows` under `header` in columns three spaces apart, with no trailing blanks.
pub fn format_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|title| (*title).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            // Writing to a String cannot fail.
            let _ = write!(line, "{cell:<width$}   ");
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table
}

pub fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_owned()
}

pub fn containers_table(containers: &[Container]) -> String {
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|container| {
            vec![
                container.id.clone(),
                container
                    .processes
                    .first()
                    .map_or_else(|| "-".to_owned(), |init| init.pid.to_string()),
                container.status.clone(),
                container.processes.len().to_string(),
                container.bundle_path.clone(),
            ]
        })
        .collect();
    format_table(&["ID", "PID", "STATUS", "PROCESSES", "BUNDLE"], &rows)
}

pub fn containers_json(containers: &[Container]) -> Value {
    containers
        .iter()
        .map(|container| {
            json!({
                "id": container.id,
                "pid": container.processes.first().map(|init| init.pid),
                "status": container.status,
                "processes": container.processes.len(),
                "bundlePath": container.bundle_path,
            })
        })
        .collect()
}

pub fn state_text(state: &StateResponse) -> String {
    let machine = match &state.machine {
        Some(machine) => format!(
            "machine {}: {} cpus, {} memory\n",
            machine.id,
            machine.cpus,
            human_bytes(machine.memory)
        ),
        None => "machine: not reported\n".to_owned(),
    };
    let rows: Vec<Vec<String>> = state
        .containers
        .iter()
        .flat_map(|container| {
            container.processes.iter().map(|process| {
                vec![
                    container.id.clone(),
                    container.status.clone(),
                    process.pid.to_string(),
                    user_text(process.user.as_ref()),
                    yes_no(process.terminal),
                    process.cwd.clone(),
                    shell_words(&process.args),
                ]
            })
        })
        .collect();
    let table = format_table(
        &[
            "CONTAINER",
            "STATUS",
            "PID",
            "USER",
            "TERMINAL",
            "CWD",
            "ARGS",
        ],
        &rows,
    );
    format!("{machine}\n{table}")
}

/// `uid:gid`, with additional groups after a `+`.
fn user_text(user: Option<&User>) -> String {
    let Some(user) = user else {
        return "-".to_owned();
    };
    let mut text = format!("{}:{}", user.uid, user.gid);
    if !user.additional_gids.is_empty() {
        let groups: Vec<String> = user.additional_gids.iter().map(u32::to_string).collect();
        text.push('+');
        text.push_str(&groups.join(","));
    }
    text
}

/// Binary (1024-based) units with one decimal, bytes as they are.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Arguments joined so that a shell would split them back the same way.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(word: &str) -> Cow<'_, str> {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

/// Field names follow the proto3 JSON mapping (lowerCamelCase), as other clients of the API see them.
fn user_json(user: Option<&User>) -> Value {
    user.map_or(
        Value::Null,
        |user| json!({"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids}),
    )
}

fn process_json(process: &Process) -> Value {
    json!({
        "pid": process.pid,
        "args": process.args,
        "env": process.env,
        "cwd": process.cwd,
        "user": user_json(process.user.as_ref()),
        "terminal": process.terminal,
    })
}

fn container_json(container: &Container) -> Value {
    json!({
        "id": container.id,
        "bundlePath": container.bundle_path,
        "status": container.status,
        "processes": container.processes.iter().map(process_json).collect::<Vec<_>>(),
    })
}

fn machine_json(machine: Option<&Machine>) -> Value {
    machine.map_or(
        Value::Null,
        |machine| json!({"id": machine.id, "cpus": machine.cpus, "memory": machine.memory}),
    )
}

pub fn checkpoint_json(checkpoint: &Checkpoint) -> Value {
    json!({
        "name": checkpoint.name,
        "exit": checkpoint.exit,
        "tcp": checkpoint.tcp,
        "unixSockets": checkpoint.unix_sockets,
        "shell": checkpoint.shell,
    })
}

pub fn state_json(state: &StateResponse) -> Value {
    json!({
        "machine": machine_json(state.machine.as_ref()),
        "containers": state.containers.iter().map(container_json).collect::<Vec<_>>(),
    })
}

pub fn event_json(event: &Event, received: SystemTime) -> Value {
    json!({
        "time": rfc3339(received),
        "type": event.r#type,
        "id": event.id,
        "pid": event.pid,
        "status": event.status,
        "bundlePath": event.bundle_path,
        "signal": event.signal,
        "process": event.process.as_ref().map_or(Value::Null, process_json),
        "containers": event.containers.iter().map(container_json).collect::<Vec<_>>(),
        "checkpoint": event.checkpoint.as_ref().map_or(Value::Null, checkpoint_json),
    })
}

/// One line per event: the time it was received, its type, the container, then the fields set.
pub fn event_line(event: &Event, received: SystemTime) -> String {
    let mut line = format!("{}  {:<15}  {}", rfc3339(received), event.r#type, event.id);
    if event.pid != 0 {
        let _ = write!(line, "  pid={}", event.pid);
    }
    // An exit status of 0 is news; elsewhere a zero status is just unset.
    if event.r#type == "exit" || event.status != 0 {
        let _ = write!(line, "  status={}", event.status);
    }
    if event.signal != 0 {
        let _ = write!(line, "  signal={}", event.signal);
    }
    if !event.bundle_path.is_empty() {
        let _ = write!(line, "  bundle={}", event.bundle_path);
    }
    if let Some(process) = &event.process {
        let _ = write!(line, "  args={}", shell_words(&process.args));
    }
    if let Some(checkpoint) = &event.checkpoint {
        let _ = write!(line, "  checkpoint={}", checkpoint.name);
    }
    line
}

/// UTC, millisecond precision: `2024-05-01T12:34:56.789Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let second_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let rows = vec![
            vec!["web".to_owned(), "12345".to_owned(), "".to_owned()],
            vec!["database-1".to_owned(), "7".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            format_table(&["ID", "PID", "NOTE"], &rows),
            "ID           PID     NOTE\n\
             web          12345\n\
             database-1   7       x\n"
        );
        assert_eq!(format_table(&["ID", "PID"], &[]), "ID   PID\n");
    }

    #[test]
    fn container_table_shows_the_init_pid_and_process_count() {
        let process = |pid| Process {
            pid,
            ..Process::default()
        };
        let containers = vec![
            Container {
                id: "c1".to_owned(),
                bundle_path: "/b".to_owned(),
                status: "running".to_owned(),
                processes: vec![process(40), process(41)],
                ..Container::default()
            },
            Container {
                id: "c2".to_owned(),
                bundle_path: "/b2".to_owned(),
                status: "paused".to_owned(),
                ..Container::default()
            },
        ];
        assert_eq!(
            containers_table(&containers),
            "ID   PID   STATUS    PROCESSES   BUNDLE\n\
             c1   40    running   2           /b\n\
             c2   -     paused    0           /b2\n"
        );
        assert_eq!(
            containers_json(&containers)[0],
            json!({"id": "c1", "pid": 40, "status": "running", "processes": 2, "bundlePath": "/b"})
        );
        assert_eq!(containers_json(&containers)[1]["pid"], Value::Null);
    }

    #[test]
    fn memory_is_shown_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(16_777_216_000), "15.6 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn args_are_quoted_only_when_a_shell_needs_it() {
        let args: Vec<String> = ["sh", "-c", "echo it's; sleep 1", ""]
            .iter()
            .map(|word| (*word).to_owned())
            .collect();
        assert_eq!(shell_words(&args), r"sh -c 'echo it'\''s; sleep 1' ''");
    }

    #[test]
    fn users_show_groups() {
        let user = User {
            uid: 1000,
            gid: 100,
            additional_gids: vec![10, 20],
        };
        assert_eq!(user_text(Some(&user)), "1000:100+10,20");
        assert_eq!(user_text(None), "-");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339(leap_day), "2000-02-29T12:34:56.789Z");
        let time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(time), "2023-11-14T22:13:20.000Z");
        let new_year = UNIX_EPOCH + Duration::from_secs(1_735_689_600);
        assert_eq!(rfc3339(new_year), "2025-01-01T00:00:00.000Z");
    }

    #[test]
    fn event_lines_show_the_fields_that_are_set() {
        let exit = Event {
            r#type: "exit".to_owned(),
            id: "c1".to_owned(),
            pid: 42,
            ..Event::default()
        };
        assert_eq!(
            event_line(&exit, UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z  exit             c1  pid=42  status=0"
        );
        let start = Event {
            r#type: "start-container".to_owned(),
            id: "c1".to_owned(),
            pid: 42,
            bundle_path: "/b".to_owned(),
            ..Event::default()
        };
        assert_eq!(
            event_line(&start, UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z  start-container  c1  pid=42  bundle=/b"
        );
        assert_eq!(event_json(&exit, UNIX_EPOCH)["process"], Value::Null);
        assert_eq!(event_json(&start, UNIX_EPOCH)["bundlePath"], "/b");
    }
}
