//! A request with both `Content-Length` and `Transfer-Encoding` is the classic way to smuggle
//! a second request past a proxy that reads the length one way to a server that reads it the
//! other. hyper reads such a request as chunked and drops the length before the proxy sees
//! the request, so the proxy cannot refuse it from the parsed request alone. This watches the
//! bytes of an HTTP/1 connection as hyper reads them, follows the framing of each request
//! (head, then a body by length or by chunks), and notes for every head whether it carried
//! both; the proxy answers such a request 400 without sending it on.
//!
//! It fails closed: when it cannot follow the framing (a line it will not read whole, a chunk
//! not ended by CRLF, a chunk size it cannot read, more pipelined heads than it keeps), every
//! later request on the connection gets 400 too. It keeps following across a request that
//! asks for an upgrade (hyper goes on with HTTP/1 when the answer is not 101), and stops only
//! once the proxy has joined the connection to a target's after a 101.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header, chunk-size or trailer line looked at whole; a longer `Content-Length` or
/// `Transfer-Encoding` line, chunk-size or trailer line loses the framing.
const LINE_CAP: usize = 1024;
/// Most verdicts kept unread (more pipelined heads than this lose the framing).
const MAX_PENDING: usize = 1024;

/// What the watcher found, shared with the requests of its connection.
#[derive(Debug, Default)]
pub struct Found {
    /// Per request head, in order: true when it had both headers.
    heads: VecDeque<bool>,
    /// The watcher could not follow the framing.
    lost: bool,
    /// The connection was joined to a target's (after a 101): no more requests come.
    upgraded: bool,
}

pub type Verdicts = Arc<Mutex<Found>>;

/// What a request is, as far as its framing goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// Both Content-Length and Transfer-Encoding.
    Ambiguous,
    /// The watcher lost the connection's framing before this request.
    Unfollowed,
}

/// The verdict on the connection's next request. A request whose head was not seen (the
/// framing was lost before it) is refused: fail closed.
pub fn next(verdicts: &Verdicts) -> Verdict {
    let Ok(mut found) = verdicts.lock() else {
        return Verdict::Unfollowed;
    };
    match found.heads.pop_front() {
        Some(true) => Verdict::Ambiguous,
        Some(false) => Verdict::Clean,
        None => Verdict::Unfollowed,
    }
}

/// The connection now carries another protocol: the watching ends.
pub fn upgraded(verdicts: &Verdicts) {
    if let Ok(mut found) = verdicts.lock() {
        found.upgraded = true;
    }
}

#[derive(Debug)]
enum Scan {
    Head(Head),
    /// Body bytes still to come.
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data: how many of its two bytes are still to come.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, up to an empty one.
    Trailers(Vec<u8>),
    /// Not watched, closed by hyper after this, or joined to a target after a 101.
    Off,
    /// Framing this does not follow: every later request is refused.
    Lost,
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
        let Ok(mut found) = self.verdicts.lock() else {
            return;
        };
        if found.heads.len() < MAX_PENDING {
            found.heads.push_back(both);
        } else {
            found.lost = true;
            drop(found);
            self.scan = Scan::Lost;
        }
    }

    fn lose(&mut self) {
        if let Ok(mut found) = self.verdicts.lock() {
            found.lost = true;
        }
        self.scan = Scan::Lost;
    }

    /// Follows `bytes` through the framing.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.scan {
                Scan::Off | Scan::Lost => return,
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
                    // Exactly CRLF, as hyper wants it.
                    let want = if *left == 2 { b'\r' } else { b'\n' };
                    if bytes[0] != want {
                        self.lose();
                        return;
                    }
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
                        if line.len() >= LINE_CAP {
                            self.lose();
                            return;
                        }
                        line.push(b);
                        continue;
                    }
                    let text = std::mem::take(line);
                    // hyper ends chunk-size and trailer lines at CRLF only.
                    let Some(text) = text.strip_suffix(b"\r") else {
                        self.lose();
                        return;
                    };
                    let trailers = matches!(self.scan, Scan::Trailers(_));
                    self.scan = if trailers {
                        if text.is_empty() {
                            Scan::Head(Head::default())
                        } else {
                            Scan::Trailers(Vec::new())
                        }
                    } else {
                        let digits = text.split(|c| *c == b';').next().unwrap_or(b"");
                        let size = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|d| u64::from_str_radix(d.trim(), 16).ok());
                        match size {
                            Some(0) => Scan::Trailers(Vec::new()),
                            Some(n) => Scan::ChunkData(n),
                            None => {
                                self.lose();
                                return;
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
                        let both = head.length.is_some() && head.encoding;
                        // hyper answers both (and a final coding other than chunked) and
                        // closes the connection: nothing after such a head is read.
                        let next = if both || head.encoding && !head.chunked {
                            Scan::Off
                        } else if head.encoding {
                            Scan::ChunkSize(Vec::new())
                        } else {
                            match head.length {
                                Some(n) if n > 0 => Scan::Fixed(n),
                                _ => Scan::Head(Head::default()),
                            }
                        };
                        self.scan = next;
                        self.note(both);
                        continue;
                    }
                    head.lines += 1;
                    if head.lines == 1 {
                        continue;
                    }
                    let Some(colon) = line.iter().position(|c| *c == b':') else {
                        continue;
                    };
                    let name = line[..colon].to_ascii_lowercase();
                    let value = String::from_utf8_lossy(&line[colon + 1..]).to_ascii_lowercase();
                    let value = value.trim();
                    match name.as_slice() {
                        b"content-length" | b"transfer-encoding" if long => {
                            self.lose();
                            return;
                        }
                        b"content-length" => head.length = value.parse().ok().or(Some(0)),
                        b"transfer-encoding" => {
                            head.encoding = true;
                            head.chunked = value
                                .rsplit(',')
                                .next()
                                .is_some_and(|v| v.trim() == "chunked");
                        }
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
            let watching = !matches!(self.scan, Scan::Off | Scan::Lost);
            if watching && self.verdicts.lock().is_ok_and(|f| f.upgraded) {
                self.scan = Scan::Off;
            } else if watching {
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

    /// The verdicts noted, and whether the framing was lost.
    fn watch(input: &[&[u8]]) -> (Vec<bool>, bool) {
        let (mut w, v) = Watched::new(());
        for piece in input {
            w.feed(piece);
        }
        let found = v.lock().unwrap();
        (found.heads.iter().copied().collect(), found.lost)
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
            b"GET /y HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            both.as_slice(),
            b"GET /after HTTP/1.1\r\n\r\n",
        ]
        .concat();
        // Whole, and a byte at a time; an upgrade asked for (and not given) is followed past.
        let want = (vec![false, false, false, false, true], false);
        assert_eq!(watch(&[&all]), want);
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(watch(&bytes), want);
    }

    /// Seen in review: a trailer section ended by a bare LF is one trailer to hyper; read as
    /// an end it would queue a phantom head's verdict for the next request to take.
    #[test]
    fn framing_it_cannot_follow_fails_closed() {
        let bare_lf = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /x HTTP/1.1\n\n\r\n\r\n";
        assert_eq!(watch(&[bare_lf]), (vec![false], true));
        let bad_chunk_end =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n";
        assert!(watch(&[bad_chunk_end]).1);
        let long_length = format!(
            "GET / HTTP/1.1\r\nContent-Length: {}5\r\n\r\n",
            " ".repeat(2000)
        );
        assert!(watch(&[long_length.as_bytes()]).1);
        let many = b"GET / HTTP/1.1\n\n".repeat(MAX_PENDING + 1);
        let (heads, lost) = watch(&[&many]);
        assert_eq!((heads.len(), lost), (MAX_PENDING, true));
        // Past the point it was lost, every request is refused.
        let (mut w, v) = Watched::new(());
        w.feed(bad_chunk_end);
        assert_eq!(next(&v), Verdict::Clean);
        assert_eq!(next(&v), Verdict::Unfollowed);
    }
}
