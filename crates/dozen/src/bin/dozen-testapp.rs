//! A minimal 12-factor HTTP service for dozen's own tests and benchmarks (std only, so it
//! starts in a millisecond and stays small).
//!
//! - listens on `$PORT` when set; `GET /healthz` -> ok, `GET /env/NAME` -> the variable,
//!   `GET /pid` -> its pid, `GET /sleep/MS` -> answers after MS milliseconds, anything else
//!   -> `hello from $DOZEN_TASK`
//! - logs one line per request to stdout
//! - `EXIT_AFTER_MS` / `EXIT_CODE`: exits on its own (to test crash handling)
//! - `EMIT_LINES=N`: prints N numbered lines at start

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn answer(mut stream: TcpStream) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Drain headers.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let body = if path == "/healthz" {
        "ok".to_string()
    } else if let Some(name) = path.strip_prefix("/env/") {
        std::env::var(name).unwrap_or_default()
    } else if path == "/pid" {
        std::process::id().to_string()
    } else if let Some(ms) = path.strip_prefix("/sleep/") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
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
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn main() {
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
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || answer(stream));
            }
        }
        Err(_) => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}
