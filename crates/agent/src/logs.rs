//! Reading task logs written by the shims, for `dozen logs`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
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

/// Where a reader of a task's log is: a file (by inode, which a rotation keeps: the file only
/// changes its name) and the offset after the last complete line read from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// 0: no file yet.
    pub inode: u64,
    pub offset: u64,
}

fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Reads complete lines after `at` (at most [`MAX_READ`] bytes of a file per call); returns
/// them and where to go on. When the shim rotated the file since, the rest of it (now the
/// previous file) comes first, over as many calls as it takes, then the new file from its
/// start; a file rotated away twice in between is gone, and the new one is read from its start.
pub fn read_from(
    path: &Path,
    at: Position,
    service: &str,
    task: &str,
) -> std::io::Result<(Vec<LogLine>, Position)> {
    let current = inode_of(path);
    if at.inode == 0 || Some(at.inode) == current {
        let (lines, offset) = read_complete(path, at.offset, service, task)?;
        let inode = current.unwrap_or(0);
        let offset = if inode == 0 { 0 } else { offset };
        return Ok((lines, Position { inode, offset }));
    }
    let previous = path.with_file_name(crate::shim::LOG_PREVIOUS);
    let mut lines = Vec::new();
    if inode_of(&previous) == Some(at.inode) {
        let (rest, offset) = read_complete(&previous, at.offset, service, task)?;
        let len = std::fs::metadata(&previous).map(|m| m.len()).unwrap_or(0);
        if offset < len && offset > at.offset {
            // More of the old file to come: the next call goes on there.
            let at = Position {
                inode: at.inode,
                offset,
            };
            return Ok((rest, at));
        }
        lines = rest;
    }
    let (more, offset) = read_complete(path, 0, service, task)?;
    lines.extend(more);
    let inode = current.unwrap_or(0);
    let offset = if inode == 0 { 0 } else { offset };
    Ok((lines, Position { inode, offset }))
}

/// Longest stored line read whole: a shim's line is at most 64 KiB and its prefix.
const MAX_STORED_LINE: u64 = 128 * 1024;
/// Most a follower reads of a file at once, however far behind it is.
const MAX_READ: u64 = 4 * 1024 * 1024;

/// Every line of a task's log, oldest first (the previous file, then the current one), read as
/// they are asked for: a whole log is never in memory. A partial last line is not a line yet.
pub struct LineReader {
    /// Both files, opened together: a rotation while reading renames them, never swaps them.
    files: std::collections::VecDeque<File>,
    reading: Option<BufReader<File>>,
    /// The current file's inode (0: none).
    inode: u64,
    service: String,
    task: String,
    raw: Vec<u8>,
    /// Bytes of complete lines read from the file being read.
    offset: u64,
}

impl LineReader {
    pub fn new(path: &Path, service: &str, task: &str) -> LineReader {
        use std::os::unix::fs::MetadataExt;
        let previous = File::open(path.with_file_name(crate::shim::LOG_PREVIOUS)).ok();
        let current = File::open(path).ok();
        let inode = current
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.ino());
        LineReader {
            files: previous.into_iter().chain(current).collect(),
            reading: None,
            inode,
            service: service.to_string(),
            task: task.to_string(),
            raw: Vec::new(),
            offset: 0,
        }
    }
    /// Where a follower goes on once every line has been read.
    pub fn end(&self) -> Position {
        Position {
            inode: self.inode,
            offset: if self.inode == 0 { 0 } else { self.offset },
        }
    }
}

impl Iterator for LineReader {
    type Item = LogLine;
    fn next(&mut self) -> Option<LogLine> {
        loop {
            let Some(reader) = &mut self.reading else {
                let file = self.files.pop_front()?;
                self.offset = 0;
                self.reading = Some(BufReader::with_capacity(64 * 1024, file));
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
    /// Per log, where a follower goes on, once every line has been read.
    pub fn ends(&self) -> Vec<Position> {
        self.logs.iter().map(LineReader::end).collect()
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
) -> std::io::Result<(Vec<LogLine>, Position)> {
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
fn tail_lines(path: &Path, n: usize) -> std::io::Result<(Vec<Vec<u8>>, Position)> {
    use std::os::unix::fs::MetadataExt;
    const BLOCK: u64 = 64 * 1024;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), Position::default()))
        }
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    let (len, inode) = (meta.len(), meta.ino());
    // Blocks from the end backwards, newest first, each counted once, until they hold more
    // than `n` lines.
    let mut start = len;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut newlines = 0;
    while newlines <= n && start > 0 {
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0u8; (start - from) as usize];
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(&mut block)?;
        newlines += block.iter().filter(|b| **b == b'\n').count();
        blocks.push(block);
        start = from;
    }
    let buf: Vec<u8> = blocks.into_iter().rev().flatten().collect();
    // Up to the last newline: a partial last line is not a line yet.
    let Some(last) = buf.iter().rposition(|b| *b == b'\n') else {
        return Ok((
            Vec::new(),
            Position {
                inode,
                offset: start,
            },
        ));
    };
    let end = Position {
        inode,
        offset: start + last as u64 + 1,
    };
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
        let (lines, off) = read_from(&path, Position::default(), "web", "web-1").unwrap();
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
        assert_eq!(end.offset, std::fs::metadata(&current).unwrap().len());
        let (tail, _) = read_tail(&previous, 2, "web", "web-1").unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].line, "line 199999");

        // A follower at offset 40 of a 60-byte file that is then rotated.
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(crate::shim::LOG);
        std::fs::write(&current, lines(0, 4)).unwrap();
        let (seen, offset) = read_from(&current, Position::default(), "web", "web-1").unwrap();
        assert_eq!(seen.len(), 4);
        std::fs::write(&current, format!("{}{}", lines(0, 4), lines(4, 6))).unwrap();
        std::fs::rename(&current, dir.path().join(crate::shim::LOG_PREVIOUS)).unwrap();
        std::fs::write(&current, lines(6, 7)).unwrap();
        let (next, _) = read_from(&current, offset, "web", "web-1").unwrap();
        let texts: Vec<&str> = next.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["line 4", "line 5", "line 6"]);
    }

    /// Seen in review: a follower far behind read only 4 MiB of the rotated file, then jumped
    /// to the new one; a rotation was told by size, so a new file already past the offset was
    /// not seen as one. Files are told apart by inode, and the old one is read to its end.
    #[test]
    fn a_follower_far_behind_reads_all_of_a_rotated_file_then_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(crate::shim::LOG);
        let line = |i: u32| format!("{i} o {} {i}\n", "x".repeat(100));
        std::fs::write(&current, line(0)).unwrap();
        let (_, mut at) = read_from(&current, Position::default(), "web", "web-1").unwrap();
        // 10 MB more in the same file, then it is rotated and the new file grows past `at`.
        let more: String = (1..100_000).map(line).collect();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&current)
            .unwrap();
        std::io::Write::write_all(&mut f, more.as_bytes()).unwrap();
        std::fs::rename(&current, dir.path().join(crate::shim::LOG_PREVIOUS)).unwrap();
        let newer: String = (100_000..100_100).map(line).collect();
        std::fs::write(&current, newer).unwrap();
        let mut seen = Vec::new();
        loop {
            let (lines, next) = read_from(&current, at, "web", "web-1").unwrap();
            if lines.is_empty() {
                break;
            }
            seen.extend(lines.into_iter().map(|l| l.ts_ms));
            at = next;
        }
        assert_eq!(seen, (1..100_100u64).collect::<Vec<_>>());
    }
}
