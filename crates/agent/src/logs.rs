//! Reading task logs written by the shims, for `dozen logs`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use dozen_api::{LogLine, LogStream};

/// Parses one `MILLIS o|e TEXT` line of a shim's output file.
pub fn parse_line(service: &str, task: &str, raw: &[u8]) -> Option<LogLine> {
    let text = String::from_utf8_lossy(raw);
    let (ts, rest) = text.split_once(' ')?;
    let (stream, line) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(LogLine {
        ts_ms: ts.parse().ok()?,
        service: service.to_string(),
        task: task.to_string(),
        stream: if stream == "e" {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        },
        line: line.to_string(),
    })
}

/// Reads complete lines from `offset`; returns them and the offset after the last one.
pub fn read_from(
    path: &Path,
    offset: u64,
    service: &str,
    task: &str,
) -> std::io::Result<(Vec<LogLine>, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
        return Ok((Vec::new(), offset));
    };
    let lines = buf[..end]
        .split(|b| *b == b'\n')
        .filter_map(|l| parse_line(service, task, l))
        .collect();
    Ok((lines, offset + end as u64 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shim_lines_and_keeps_partial_ones_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        std::fs::write(&path, b"1000 o hello world\n1001 e oops\n1002 o part").unwrap();
        let (lines, off) = read_from(&path, 0, "web", "web-1").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].line, "hello world");
        assert_eq!(lines[1].stream, LogStream::Stderr);
        let (more, off2) = read_from(&path, off, "web", "web-1").unwrap();
        assert!(more.is_empty());
        assert_eq!(off2, off);
    }
}
