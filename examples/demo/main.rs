//! The demo stack's services, as one small binary: `dozen-demo web|catalog|orders|worker`.
//!
//! Each is a 12-factor app: config from the environment, `$PORT`, logs to stdout, the URLs of
//! the services it uses from `CATALOG_URL` / `ORDERS_URL` (dozen points them through its
//! proxy), and a graceful stop on SIGTERM (finish what is in flight, then exit). Std only, so it
//! builds in seconds and starts in a millisecond.
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);
static SERVED: AtomicU64 = AtomicU64::new(0);

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn task() -> String {
    env("DOZEN_TASK", "local")
}

fn log(line: &str) {
    println!("{line}");
}

/// SIGTERM: stop taking work, finish what is in flight, exit 0.
#[allow(unsafe_code)]
fn on_sigterm() {
    // SAFETY: signal-mask calls on a zeroed sigset; SIGTERM is then taken by one thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            libc::sigwait(&set, &mut sig);
            STOPPING.store(true, Ordering::SeqCst);
            log(&format!(
                "stopping: finishing {} request(s) in flight",
                IN_FLIGHT.load(Ordering::SeqCst)
            ));
            while IN_FLIGHT.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            log(&format!(
                "stopped after serving {} request(s)",
                SERVED.load(Ordering::SeqCst)
            ));
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        });
    }
}

/// GET a URL (http only) and return its body.
fn get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(authority).map_err(|e| format!("{authority}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
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
    if status.starts_with('2') {
        Ok(body)
    } else {
        Err(format!("{url} answered {status}"))
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    close: bool,
) -> bool {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
        body.len()
    )
    .and_then(|_| stream.flush())
    .is_ok()
}

/// One connection: requests in turn (HTTP/1.1 keep-alive) until the peer closes, asks to
/// close, or we are stopping. Only a request being answered counts as in flight.
fn connection(stream: TcpStream, handler: fn(&str) -> (&'static str, &'static str, String)) {
    let mut writer = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let mut close = line.ends_with("HTTP/1.0\r\n");
        let mut body_len = 0usize;
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => {
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Ok(_) if h == "\r\n" || h == "\n" => break,
                Ok(_) => {
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("connection:") && lower.contains("close") {
                        close = true;
                    } else if let Some(v) = lower.strip_prefix("content-length:") {
                        body_len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
        }
        let mut discard = vec![0u8; body_len.min(1 << 20)];
        let _ = reader.read_exact(&mut discard);
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (status, ct, body) = handler(&path);
        let close = close || STOPPING.load(Ordering::SeqCst);
        let written = respond(&mut writer, status, ct, &body, close);
        SERVED.fetch_add(1, Ordering::SeqCst);
        if !path.ends_with("/healthz") && env("LOG_REQUESTS", "true") == "true" {
            log(&format!(
                "{} {path} -> {status}",
                line.split_whitespace().next().unwrap_or("?")
            ));
        }
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        if close || !written {
            return;
        }
    }
}

/// Serves `handler(path) -> (status, content type, body)` on $PORT until SIGTERM.
fn serve(handler: fn(&str) -> (&'static str, &'static str, String)) {
    let port = env("PORT", "8000");
    let listener = match TcpListener::bind(("0.0.0.0", port.parse::<u16>().unwrap_or(8000))) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("cannot listen on port {port}: {e}"));
            std::process::exit(1);
        }
    };
    log(&format!("{} listening on port {port}", task()));
    for stream in listener.incoming().flatten() {
        if STOPPING.load(Ordering::SeqCst) {
            continue;
        }
        let _ = stream.set_nodelay(true);
        std::thread::spawn(move || connection(stream, handler));
    }
}

fn catalog(path: &str) -> (&'static str, &'static str, String) {
    if path.ends_with("/healthz") {
        return ("200 OK", "text/plain", "ok".into());
    }
    let items = env("CATALOG_ITEMS", "teapot,kettle,mug");
    let list: Vec<String> = items
        .split(',')
        .map(|i| format!("\"{}\"", i.trim()))
        .collect();
    (
        "200 OK",
        "application/json",
        format!(
            "{{\"products\":[{}],\"served_by\":\"{}\"}}",
            list.join(","),
            task()
        ),
    )
}

fn orders(path: &str) -> (&'static str, &'static str, String) {
    if path.ends_with("/healthz") {
        return ("200 OK", "text/plain", "ok".into());
    }
    if let Some((_, ms)) = path.split_once("/slow/") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0).min(60_000)));
    }
    let n = SERVED.load(Ordering::SeqCst);
    (
        "200 OK",
        "application/json",
        format!(
            "{{\"open_orders\":{},\"currency\":\"{}\",\"served_by\":\"{}\"}}",
            3 + n % 5,
            env("CURRENCY", "EUR"),
            task()
        ),
    )
}

fn web(path: &str) -> (&'static str, &'static str, String) {
    if path.ends_with("/healthz") {
        return ("200 OK", "text/plain", "ok".into());
    }
    let catalog = get(&format!("{}/products", env("CATALOG_URL", "")));
    let orders = get(&format!("{}/orders", env("ORDERS_URL", "")));
    let show = |r: &Result<String, String>| match r {
        Ok(b) => b.replace('<', "&lt;"),
        Err(e) => format!("unavailable: {}", e.replace('<', "&lt;")),
    };
    let status = if catalog.is_ok() && orders.is_ok() {
        "200 OK"
    } else {
        "502 Bad Gateway"
    };
    let page = format!(
        "<!doctype html><html><head><title>{title}</title></head><body>\
         <h1>{title}</h1><p>page by task {task}</p>\
         <h2>catalog</h2><pre id=\"catalog\">{c}</pre>\
         <h2>orders</h2><pre id=\"orders\">{o}</pre></body></html>\n",
        title = env("SHOP_NAME", "dozen demo shop"),
        task = task(),
        c = show(&catalog),
        o = show(&orders),
    );
    (status, "text/html; charset=utf-8", page)
}

fn worker() {
    let every = Duration::from_millis(env("WORK_EVERY_MS", "2000").parse().unwrap_or(2000));
    log(&format!("{} working every {every:?}", task()));
    let mut round = 0u64;
    while !STOPPING.load(Ordering::SeqCst) {
        round += 1;
        match get(&format!("{}/orders", env("ORDERS_URL", ""))) {
            Ok(body) => log(&format!("round {round}: checked orders: {body}")),
            Err(e) => log(&format!("round {round}: orders unavailable: {e}")),
        }
        std::thread::sleep(every);
    }
}

fn main() {
    on_sigterm();
    match std::env::args().nth(1).as_deref() {
        Some("web") => serve(web),
        Some("catalog") => serve(catalog),
        Some("orders") => serve(orders),
        Some("worker") => worker(),
        _ => {
            eprintln!("usage: dozen-demo web|catalog|orders|worker");
            std::process::exit(2);
        }
    }
}
