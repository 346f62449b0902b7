//! Answers of newline-delimited JSON (logs, events), written as they are produced: in pieces
//! of about [`CHUNK`] bytes, or, for a tail, only the last lines (held until the end).

use std::collections::VecDeque;

use serde::Serialize;

/// Bytes of encoded lines sent at once.
pub const CHUNK: usize = 64 * 1024;

/// Appends `value` as one JSON line.
pub fn push_line<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    if serde_json::to_writer(&mut *out, value).is_ok() {
        out.push(b'\n');
    }
}

/// Lines on their way out: every one, a chunk at a time, or with `tail` only the last `n`.
pub struct Lines<T> {
    tail: Option<usize>,
    kept: VecDeque<T>,
    chunk: Vec<u8>,
}

impl<T: Serialize> Lines<T> {
    pub fn new(tail: Option<usize>) -> Self {
        Lines {
            tail,
            kept: VecDeque::new(),
            chunk: Vec::with_capacity(CHUNK),
        }
    }

    /// Takes one line; returns a chunk when one is full (never with a tail).
    pub fn push(&mut self, line: T) -> Option<Vec<u8>> {
        match self.tail {
            Some(n) => {
                self.kept.push_back(line);
                if self.kept.len() > n {
                    self.kept.pop_front();
                }
                None
            }
            None => {
                push_line(&mut self.chunk, &line);
                (self.chunk.len() >= CHUNK).then(|| std::mem::take(&mut self.chunk))
            }
        }
    }

    /// What is left to send (the tail, or the last partial chunk), if anything.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        for line in std::mem::take(&mut self.kept) {
            push_line(&mut self.chunk, &line);
        }
        (!self.chunk.is_empty()).then_some(self.chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_lines_and_everything_else_goes_in_chunks() {
        let mut tail = Lines::new(Some(2));
        for i in 0..5 {
            assert!(tail.push(i).is_none());
        }
        assert_eq!(tail.finish().unwrap(), b"3\n4\n");
        let mut all = Lines::new(None);
        let big = "x".repeat(1000);
        let sent: usize = (0..100)
            .filter_map(|_| all.push(&big))
            .map(|c| c.len())
            .sum();
        assert!(sent >= CHUNK, "{sent}");
        assert!(all.finish().is_some());
        assert!(Lines::<u8>::new(None).finish().is_none());
    }
}
