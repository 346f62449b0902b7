//! A minimal 12-factor HTTP service for dozen's own tests and benchmarks (std only, so it
//! starts in a millisecond and stays small).
//!
//! - listens on `$PORT` when set; `GET /healthz` -> ok, `GET /env/NAME` -> the variable,
//!   `GET /pid` -> its pid, `GET /sleep/MS` -> answers after MS milliseconds, `GET /status/NNN`
//!   -> that status, anything else
//!   -> `hello from $DOZEN_TASK`
//! - logs one line per request to stdout
//! - `EXIT_AFTER_MS` / `EXIT_CODE`: exits on its own (to test crash handling)
//! - `ALLOC_MB`: takes and touches that much memory at start (to meet a memory limit)
//! - `dozen-testapp exit N`: exits with code N at once (a `command` health check)
//! - `COUNT_FILE`: counts its starts in that file and prints `start N`
//! - `EMIT_LINES=N`: prints N numbered lines at start
//! - `GET /headers` -> the request headers; `GET /fetch/VAR/PATH` -> GET `$VAR/PATH` (service
//!   discovery through the proxy)
//! - SIGTERM: stops accepting, finishes the requests in flight, exits 0 (factor IX)
//! - `GET /ws`: a WebSocket echo; `FAIL_DIR`: a task named by a file there answers 500
#![deny(unsafe_code)]

#[path = "testapp/websocket.rs"]
mod websocket;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);

/// GET `url` (http://host:port/path) with a plain socket; returns the body.
fn fetch(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(authority).map_err(|e| format!("connect {authority}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let status = buf.split_whitespace().nth(1).unwrap_or("?").to_string();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    if status == "200" {
        Ok(body)
    } else {
        Err(format!("{url} answered {status}: {body}"))
    }
}

/// Blocks SIGTERM in every thread and waits for it on one: then drain and exit.
#[allow(unsafe_code)]
fn handle_sigterm() {
    // SAFETY: plain libc signal-mask calls on a zeroed sigset; this test app is std-only by
    // design and needs no other signal handling.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let set_copy = set;
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            libc::sigwait(&set_copy, &mut sig);
            STOPPING.store(true, Ordering::SeqCst);
            println!(
                "SIGTERM: finishing {} request(s) in flight",
                IN_FLIGHT.load(Ordering::SeqCst)
            );
            while IN_FLIGHT.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            println!("stopped cleanly");
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        });
    }
}

fn answer(mut stream: TcpStream) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => headers.push_str(&line),
            Err(_) => return,
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    // Endpoints are matched anywhere in the path, so they also work behind a route prefix
    // (`/api/env/NAME` reaches `/env/NAME`).
    // `/status/NNN` answers with that status (a health check that fails on purpose).
    // A task whose name is a file in $FAIL_DIR answers 500 to everything but its health
    // check: a target that fails while its checks pass (what outlier detection is for).
    let failing = !path.ends_with("/healthz")
        && std::env::var_os("FAIL_DIR").is_some_and(|dir| {
            std::path::Path::new(&dir)
                .join(std::env::var("DOZEN_TASK").unwrap_or_default())
                .exists()
        });
    let status = path
        .split_once("/status/")
        .and_then(|(_, code)| code.parse::<u16>().ok())
        .unwrap_or(if failing { 500 } else { 200 });
    let body = if status != 200 {
        format!("status {status}")
    } else if let Some((_, rest)) = path.split_once("/fetch/") {
        let (var, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let base = std::env::var(var).unwrap_or_default();
        match fetch(&format!("{base}/{tail}")) {
            Ok(b) => b,
            Err(e) => format!("fetch failed: {e}"),
        }
    } else if path.ends_with("/healthz") {
        "ok".to_string()
    } else if let Some((_, name)) = path.split_once("/env/") {
        std::env::var(name).unwrap_or_default()
    } else if let Some((_, name)) = path.split_once("/secret/") {
        // A file of the task's secrets directory (`.token` is its identity).
        let dir = std::env::var("DOZEN_SECRETS_DIR").unwrap_or_default();
        if name.contains('/') || dir.is_empty() {
            String::new()
        } else {
            std::fs::read_to_string(format!("{dir}/{name}")).unwrap_or_default()
        }
    } else if path.ends_with("/headers") {
        headers
    } else if path.ends_with("/ws") {
        return websocket::echo(reader, stream, &headers);
    } else if path.ends_with("/upgrade") {
        // Switches to a raw echo of whatever comes (an upgraded connection, as WebSocket is).
        let _ = stream.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n",
        );
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    } else if path.ends_with("/count") {
        // The request body's length (Content-Length or chunked): a body that went through.
        let lower = headers.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut sink = std::io::sink();
        let counted = match length {
            Some(n) => std::io::copy(&mut (&mut reader).take(n), &mut sink).unwrap_or(0),
            None if lower.contains("transfer-encoding: chunked") => {
                let mut total = 0u64;
                loop {
                    let mut size = String::new();
                    if reader.read_line(&mut size).unwrap_or(0) == 0 {
                        break;
                    }
                    let n = u64::from_str_radix(size.trim(), 16).unwrap_or(0);
                    if n == 0 {
                        let mut end = String::new();
                        let _ = reader.read_line(&mut end);
                        break;
                    }
                    total += std::io::copy(&mut (&mut reader).take(n), &mut sink).unwrap_or(0);
                    let mut crlf = String::new();
                    let _ = reader.read_line(&mut crlf);
                }
                total
            }
            None => 0,
        };
        format!("bytes={counted}")
    } else if path.ends_with("/pid") {
        std::process::id().to_string()
    } else if let Some((_, name)) = path.split_once("/close-once/") {
        // The first request for `name` (across every replica: a marker file in
        // $CLOSE_ONCE_DIR) gets its connection closed without an answer; later ones an answer.
        let dir = std::env::var("CLOSE_ONCE_DIR").unwrap_or_else(|_| ".".into());
        let first = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(std::path::Path::new(&dir).join(name))
            .is_ok();
        if first {
            return;
        }
        "answered".to_string()
    } else if let Some((_, ms)) = path.split_once("/sleep/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        // Said before sleeping, so a test can see the request is in flight.
        println!("sleeping {ms} ms");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(ms));
        "slept".to_string()
    } else {
        format!(
            "hello from {}",
            std::env::var("DOZEN_TASK").unwrap_or_default()
        )
    };
    println!(
        "{} {path}",
        request_line.split_whitespace().next().unwrap_or("?")
    );
    let _ = write!(
        stream,
        "HTTP/1.1 {status} Status\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn main() {
    // `dozen-testapp exit N`: ends at once with code N (a `command` health check).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("exit") {
        std::process::exit(args.get(2).and_then(|c| c.parse().ok()).unwrap_or(0));
    }
    // `dozen-testapp echo WORDS...`: says them on stdout, and on stderr with the task's PORT
    // (a command run inside the task: `dozen exec`).
    if args.get(1).map(String::as_str) == Some("echo") {
        let words = args[2..].join(" ");
        println!("{words}");
        eprintln!(
            "stderr {words} port={}",
            std::env::var("PORT").unwrap_or_default()
        );
        return;
    }
    handle_sigterm();
    // ALLOC_MB: takes (and touches) that much memory at start, to meet a memory limit.
    let _held: Vec<u8> = match std::env::var("ALLOC_MB")
        .ok()
        .and_then(|m| m.parse::<usize>().ok())
    {
        Some(mb) => vec![1u8; mb * 1024 * 1024],
        None => Vec::new(),
    };
    // SPIN: a thread that keeps one core busy (a CPU limit to meet, CPU use to see).
    if std::env::var_os("SPIN").is_some() {
        std::thread::spawn(|| {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
    }
    // TICK_MS: says `tick N` every that many milliseconds (output that goes on while no one
    // watches).
    if let Some(every) = std::env::var("TICK_MS")
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
    {
        std::thread::spawn(move || {
            for n in 1.. {
                std::thread::sleep(std::time::Duration::from_millis(every));
                println!("tick {n}");
            }
        });
    }
    // COUNT_FILE: counts its starts in that file, and says the count (data that must outlive
    // the process, in a volume).
    if let Ok(path) = std::env::var("COUNT_FILE") {
        let count = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        match std::fs::write(&path, count.to_string()) {
            Ok(()) => println!("start {count}"),
            Err(e) => eprintln!("cannot write {path}: {e}"),
        }
    }
    if let Ok(n) = std::env::var("EMIT_LINES") {
        for i in 0..n.parse::<u32>().unwrap_or(0) {
            println!("line {i}");
        }
    }
    if let Ok(ms) = std::env::var("EXIT_AFTER_MS") {
        let ms: u64 = ms.parse().unwrap_or(0);
        let code: i32 = std::env::var("EXIT_CODE")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            println!("exiting with {code} as asked");
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        });
    }
    match std::env::var("PORT") {
        Ok(port) => {
            let listener = match TcpListener::bind(("0.0.0.0", port.parse().unwrap_or(0))) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("cannot listen on {port}: {e}");
                    std::process::exit(1);
                }
            };
            println!("listening on {port}");
            // SINGLE_THREADED: one request at a time, as many small apps serve (a slow one
            // makes every other request, health checks too, wait behind it).
            let single = std::env::var_os("SINGLE_THREADED").is_some();
            for stream in listener.incoming().flatten() {
                if STOPPING.load(Ordering::SeqCst) {
                    continue;
                }
                IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
                if single {
                    answer(stream);
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                std::thread::spawn(move || {
                    answer(stream);
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        Err(_) => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}
