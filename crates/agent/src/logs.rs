//! Reading task logs written by the shims, for `dozen logs`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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

/// Appends a line of dozen's own to a task's log (a start failure: the task never wrote one).
pub fn append_note(path: &Path, text: &str) {
    use std::io::Write;
    let line = format!("{} e [dozen] {text}\n", crate::shim::wall_ms());
    let appended = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        })
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        tracing::warn!(path = %path.display(), error = %e, "cannot add a note to a task's log");
    }
}

/// Reads complete lines from `offset`; returns them and the offset after the last one. When
/// the file is shorter than `offset`, the shim rotated it since: the rest of the previous
/// file comes first, then the new one from its start.
pub fn read_from(
    path: &Path,
    offset: u64,
    service: &str,
    task: &str,
) -> std::io::Result<(Vec<LogLine>, u64)> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if offset > len {
        let previous = path.with_file_name(crate::shim::LOG_PREVIOUS);
        let (mut lines, _) = read_complete(&previous, offset, service, task)?;
        let (more, next) = read_complete(path, 0, service, task)?;
        lines.extend(more);
        return Ok((lines, next));
    }
    read_complete(path, offset, service, task)
}

/// Longest stored line read whole: a shim's line is at most 64 KiB and its prefix.
const MAX_STORED_LINE: u64 = 128 * 1024;
/// Most a follower reads of a file at once, however far behind it is.
const MAX_READ: u64 = 4 * 1024 * 1024;

/// Every line of a task's log, oldest first (the previous file, then the current one), read as
/// they are asked for: a whole log is never in memory. A partial last line is not a line yet.
pub struct LineReader {
    files: std::collections::VecDeque<PathBuf>,
    reading: Option<BufReader<File>>,
    service: String,
    task: String,
    raw: Vec<u8>,
    /// Bytes of complete lines read from the file being read.
    offset: u64,
}

impl LineReader {
    pub fn new(path: &Path, service: &str, task: &str) -> LineReader {
        LineReader {
            files: [
                path.with_file_name(crate::shim::LOG_PREVIOUS),
                path.to_path_buf(),
            ]
            .into(),
            reading: None,
            service: service.to_string(),
            task: task.to_string(),
            raw: Vec::new(),
            offset: 0,
        }
    }
    /// Where a follower goes on in the current file once every line has been read.
    pub fn end_offset(&self) -> u64 {
        self.offset
    }
}

impl Iterator for LineReader {
    type Item = LogLine;
    fn next(&mut self) -> Option<LogLine> {
        loop {
            let Some(reader) = &mut self.reading else {
                let path = self.files.pop_front()?;
                self.offset = 0;
                self.reading = File::open(path)
                    .ok()
                    .map(|f| BufReader::with_capacity(64 * 1024, f));
                continue;
            };
            self.raw.clear();
            let read = reader
                .by_ref()
                .take(MAX_STORED_LINE)
                .read_until(b'\n', &mut self.raw);
            match read {
                Ok(n) if n > 0 && self.raw.last() == Some(&b'\n') => {
                    self.offset += n as u64;
                    self.raw.pop();
                    if let Some(line) = parse_line(&self.service, &self.task, &self.raw) {
                        return Some(line);
                    }
                }
                // The end of this file, a partial last line, or a read error: the next file.
                _ => self.reading = None,
            }
        }
    }
}

/// Lines of several logs merged oldest first; each log is in time order already.
pub fn merged(mut logs: Vec<LineReader>) -> Merge {
    let heads = logs.iter_mut().map(Iterator::next).collect();
    Merge { logs, heads }
}

pub struct Merge {
    logs: Vec<LineReader>,
    heads: Vec<Option<LogLine>>,
}

impl Merge {
    /// Per log, where a follower goes on in its current file, once every line has been read.
    pub fn end_offsets(&self) -> Vec<u64> {
        self.logs.iter().map(LineReader::end_offset).collect()
    }
}

impl Iterator for Merge {
    type Item = LogLine;
    fn next(&mut self) -> Option<LogLine> {
        let oldest = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|l| (l.ts_ms, i)))
            .min()
            .map(|(_, i)| i);
        let i = oldest?;
        let line = self.heads[i].take();
        self.heads[i] = self.logs[i].next();
        line
    }
}

/// The last `n` lines of the task's log (the previous file too, if the current one holds
/// fewer), read backwards from the end: never the whole file. Returns them and the offset
/// after the last complete line of the current file.
pub fn read_tail(
    path: &Path,
    n: usize,
    service: &str,
    task: &str,
) -> std::io::Result<(Vec<LogLine>, u64)> {
    let (mut raw, end) = tail_lines(path, n)?;
    if raw.len() < n {
        let previous = path.with_file_name(crate::shim::LOG_PREVIOUS);
        let (mut before, _) = tail_lines(&previous, n - raw.len())?;
        before.append(&mut raw);
        raw = before;
    }
    let lines = raw
        .iter()
        .filter_map(|l| parse_line(service, task, l))
        .collect();
    Ok((lines, end))
}

/// The last `n` complete lines of `path` (oldest first) and the offset after the last one.
fn tail_lines(path: &Path, n: usize) -> std::io::Result<(Vec<Vec<u8>>, u64)> {
    const BLOCK: u64 = 64 * 1024;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Bytes from `start` to the end, growing backwards a block at a time.
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let newlines = buf.iter().filter(|b| **b == b'\n').count();
        if newlines > n || start == 0 {
            break;
        }
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0u8; (start - from) as usize];
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
        start = from;
    }
    // Up to the last newline: a partial last line is not a line yet.
    let Some(last) = buf.iter().rposition(|b| *b == b'\n') else {
        return Ok((Vec::new(), start));
    };
    let end = start + last as u64 + 1;
    let mut lines: Vec<Vec<u8>> = buf[..last]
        .split(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    // The first piece may be the cut end of an earlier line.
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    Ok((lines, end))
}

fn read_complete(
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
    f.take(MAX_READ).read_to_end(&mut buf)?;
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

    /// Tails are read from the end, across a rotation, and a follower reading from an offset
    /// past a rotated file gets the rest of the old file, then the new one.
    #[test]
    fn tails_come_from_the_end_and_followers_cross_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(crate::shim::LOG);
        let previous = dir.path().join(crate::shim::LOG_PREVIOUS);
        let lines = |from: u32, to: u32| -> String {
            (from..to).map(|i| format!("{i} o line {i}\n")).collect()
        };
        // 200,000 lines (several 64 KiB blocks) in the old file, 3 in the new one.
        std::fs::write(&previous, lines(0, 200_000)).unwrap();
        std::fs::write(&current, lines(200_000, 200_003)).unwrap();
        let (tail, end) = read_tail(&current, 5, "web", "web-1").unwrap();
        let texts: Vec<&str> = tail.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(
            texts,
            [
                "line 199998",
                "line 199999",
                "line 200000",
                "line 200001",
                "line 200002"
            ]
        );
        assert_eq!(end, std::fs::metadata(&current).unwrap().len());
        let (tail, _) = read_tail(&previous, 2, "web", "web-1").unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].line, "line 199999");

        // A follower at offset 40 of a 60-byte file that is then rotated.
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(crate::shim::LOG);
        std::fs::write(&current, lines(0, 4)).unwrap();
        let (seen, offset) = read_from(&current, 0, "web", "web-1").unwrap();
        assert_eq!(seen.len(), 4);
        std::fs::write(&current, format!("{}{}", lines(0, 4), lines(4, 6))).unwrap();
        std::fs::rename(&current, dir.path().join(crate::shim::LOG_PREVIOUS)).unwrap();
        std::fs::write(&current, lines(6, 7)).unwrap();
        let (next, _) = read_from(&current, offset, "web", "web-1").unwrap();
        let texts: Vec<&str> = next.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["line 4", "line 5", "line 6"]);
    }
}
