//! A request with both `Content-Length` and `Transfer-Encoding` is the classic way to smuggle
//! a second request past a proxy that reads the length one way to a server that reads it the
//! other. hyper reads such a request as chunked and drops the length before the proxy sees
//! the request, so the proxy cannot refuse it from the parsed request alone. This watches the
//! bytes of an HTTP/1 connection as hyper reads them, follows the framing of each request
//! (head, then a body by length or by chunks), and notes for every head whether it carried
//! both; the proxy answers such a request 400 without sending it on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header line looked at whole; a longer `Content-Length` or `Transfer-Encoding`
/// line stops the watching (and hyper refuses such a line anyway).
const LINE_CAP: usize = 1024;
/// Most verdicts kept unread (hyper reads at most a pipelined buffer ahead).
const MAX_PENDING: usize = 1024;

/// Per request head, in order: true when it had both headers.
pub type Verdicts = Arc<Mutex<VecDeque<bool>>>;

/// Takes the verdict of the next request; false when nothing was noted (the watching
/// stopped, or the connection is not watched).
pub fn ambiguous(verdicts: &Verdicts) -> bool {
    verdicts
        .lock()
        .map(|mut v| v.pop_front().unwrap_or(false))
        .unwrap_or(false)
}

#[derive(Debug)]
enum Scan {
    Head(Head),
    /// Body bytes still to come.
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, up to an empty one.
    Trailers(Vec<u8>),
    /// An upgrade, CONNECT, or framing this does not follow: nothing more is noted.
    Off,
}

#[derive(Debug, Default)]
struct Head {
    line: Vec<u8>,
    /// The line was longer than [`LINE_CAP`].
    long: bool,
    lines: usize,
    length: Option<u64>,
    encoding: bool,
    chunked: bool,
    upgrade: bool,
    connect: bool,
}

pub struct Watched<T> {
    inner: T,
    scan: Scan,
    verdicts: Verdicts,
}

impl<T> Watched<T> {
    pub fn new(inner: T) -> (Watched<T>, Verdicts) {
        let verdicts = Verdicts::default();
        (
            Watched {
                inner,
                scan: Scan::Head(Head::default()),
                verdicts: verdicts.clone(),
            },
            verdicts,
        )
    }

    /// Not watched (an HTTP/2 connection frames its requests itself).
    pub fn unwatched(inner: T) -> Watched<T> {
        Watched {
            inner,
            scan: Scan::Off,
            verdicts: Verdicts::default(),
        }
    }

    fn note(&mut self, both: bool) {
        if let Ok(mut v) = self.verdicts.lock() {
            if v.len() < MAX_PENDING {
                v.push_back(both);
            }
        }
    }

    /// Follows `bytes` through the framing.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.scan {
                Scan::Off => return,
                Scan::Fixed(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.scan = Scan::Head(Head::default());
                    }
                }
                Scan::ChunkData(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.scan = Scan::ChunkEnd(2);
                    }
                }
                Scan::ChunkEnd(left) => {
                    *left -= 1;
                    bytes = &bytes[1..];
                    if *left == 0 {
                        self.scan = Scan::ChunkSize(Vec::new());
                    }
                }
                Scan::ChunkSize(line) | Scan::Trailers(line) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b != b'\n' {
                        if line.len() < LINE_CAP {
                            line.push(b);
                        }
                        continue;
                    }
                    let text = std::mem::take(line);
                    let text = text.strip_suffix(b"\r").unwrap_or(&text);
                    self.scan = match &self.scan {
                        Scan::Trailers(_) if text.is_empty() => Scan::Head(Head::default()),
                        Scan::Trailers(_) => Scan::Trailers(Vec::new()),
                        _ => {
                            let digits = text.split(|c| *c == b';').next().unwrap_or(b"");
                            let size = std::str::from_utf8(digits)
                                .ok()
                                .and_then(|d| u64::from_str_radix(d.trim(), 16).ok());
                            match size {
                                Some(0) => Scan::Trailers(Vec::new()),
                                Some(n) => Scan::ChunkData(n),
                                None => Scan::Off,
                            }
                        }
                    };
                }
                Scan::Head(head) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b != b'\n' {
                        if head.line.len() < LINE_CAP {
                            head.line.push(b);
                        } else {
                            head.long = true;
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut head.line);
                    let long = std::mem::take(&mut head.long);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if line.is_empty() {
                        if head.lines == 0 {
                            // Empty lines before a request line are skipped.
                            continue;
                        }
                        let head = std::mem::take(head);
                        self.note(head.length.is_some() && head.encoding);
                        self.scan = if head.upgrade
                            || head.connect
                            || head.encoding && head.length.is_some()
                        {
                            Scan::Off
                        } else if head.encoding {
                            if head.chunked {
                                Scan::ChunkSize(Vec::new())
                            } else {
                                Scan::Off
                            }
                        } else {
                            match head.length {
                                Some(n) if n > 0 => Scan::Fixed(n),
                                _ => Scan::Head(Head::default()),
                            }
                        };
                        continue;
                    }
                    head.lines += 1;
                    if head.lines == 1 {
                        head.connect = line.starts_with(b"CONNECT ");
                        continue;
                    }
                    let Some(colon) = line.iter().position(|c| *c == b':') else {
                        continue;
                    };
                    let name = line[..colon].to_ascii_lowercase();
                    let value = String::from_utf8_lossy(&line[colon + 1..]).to_ascii_lowercase();
                    let value = value.trim();
                    match name.as_slice() {
                        b"content-length" | b"transfer-encoding" if long => self.scan = Scan::Off,
                        b"content-length" => head.length = value.parse().ok().or(Some(0)),
                        b"transfer-encoding" => {
                            head.encoding = true;
                            head.chunked = value
                                .rsplit(',')
                                .next()
                                .is_some_and(|v| v.trim() == "chunked");
                        }
                        b"upgrade" => head.upgrade = true,
                        _ => {}
                    }
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            if !matches!(self.scan, Scan::Off) {
                let fresh = &buf.filled()[before..];
                self.feed(fresh);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[&[u8]]) -> Vec<bool> {
        let (mut w, v) = Watched::new(());
        for piece in input {
            w.feed(piece);
        }
        let out = v.lock().unwrap().iter().copied().collect();
        out
    }

    #[test]
    fn each_head_gets_a_verdict_and_bodies_are_skipped() {
        let body_like_a_head =
            b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut fixed = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body_like_a_head.len()
        )
        .into_bytes();
        fixed.extend_from_slice(body_like_a_head);
        let chunked = b"POST /b HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let both =
            b"POST /c HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let all: Vec<u8> = [
            fixed.as_slice(),
            b"\r\nGET /x HTTP/1.1\r\nHost: y\r\n\r\n",
            chunked.as_slice(),
            b"GET /y HTTP/1.1\r\n\r\n",
            both.as_slice(),
            b"GET /after HTTP/1.1\r\n\r\n",
        ]
        .concat();
        // Whole, and a byte at a time.
        assert_eq!(verdicts(&[&all]), [false, false, false, false, true]);
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(verdicts(&bytes), [false, false, false, false, true]);
    }

    #[test]
    fn an_upgrade_stops_the_watching() {
        let input = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(verdicts(&[input]), [false]);
    }
}
