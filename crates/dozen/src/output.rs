//! Tables for people, JSON for scripts.

use serde::Serialize;

use crate::Output;

/// Prints rows as aligned columns under `headers`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{:<w$}  ", cell, w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

/// JSON when asked for, otherwise the table `f` prints.
pub fn listing<T: Serialize>(output: Output, value: &T, f: impl FnOnce()) {
    match output {
        Output::Json => json(value),
        Output::Table => f(),
    }
}

pub fn age(since_ms: Option<u64>) -> String {
    let Some(since) = since_ms else {
        return "-".into();
    };
    let now = dozen_agent::shim::wall_ms();
    let s = now.saturating_sub(since) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

pub use dozen_model::utc_time;
