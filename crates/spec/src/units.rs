//! Small pure parsers and validators: durations, sizes, cpu, names, image references,
//! signals, and "did you mean" suggestions.

pub(crate) const DURATION_EXAMPLES: &str =
    "durations look like \"500ms\", \"10s\", \"1m30s\" or \"2h\" (units: ms, s, m, h)";
pub(crate) const SIZE_EXAMPLES: &str = "sizes look like \"256MiB\", \"1GiB\", \"512M\", \"100k\" or a plain byte count like 1024 (k/M/G/T = powers of 1000, Ki/Mi/Gi/Ti = powers of 1024)";
pub(crate) const CPU_EXAMPLES: &str =
    "cpu is a number of cores like 0.5 or 2, or millicores like \"500m\"";

/// Parses a duration like "10s", "500ms", "1m30s", "2h" (also "0") into milliseconds.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.starts_with('-') {
        return Err(format!("negative duration `{s}`"));
    }
    if t == "0" {
        return Ok(0);
    }
    let bytes = t.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    let mut last_rank = u8::MAX;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(format!("invalid duration `{s}`: expected a number"));
        }
        let num: u64 = t
            .get(start..i)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("duration `{s}` is too large"))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = t.get(ustart..i).unwrap_or("");
        let (mult, rank) = match unit {
            "ms" => (1u64, 0u8),
            "s" => (1_000, 1),
            "m" => (60_000, 2),
            "h" => (3_600_000, 3),
            "" => return Err(format!("invalid duration `{s}`: missing unit after {num}")),
            other => return Err(format!("invalid duration `{s}`: unknown unit `{other}`")),
        };
        if rank >= last_rank {
            return Err(format!(
                "invalid duration `{s}`: units must go from largest to smallest, each once"
            ));
        }
        last_rank = rank;
        total = num
            .checked_mul(mult)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration `{s}` is too large"))?;
    }
    Ok(total)
}

/// Parses a size like "256MiB", "1GiB", "512M", "100k", "1024" into bytes.
pub(crate) fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("negative size `{s}`"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    if num.is_empty() {
        return Err(format!("invalid size `{s}`: expected a number"));
    }
    let mult: u64 = match unit {
        "" | "b" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" | "ki" | "kiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "m" | "mb" | "g" | "gb" | "mi" | "mib" | "gi" | "gib" => {
            return Err(format!(
                "invalid size `{s}`: ambiguous lowercase unit `{unit}` (write M/Mi or G/Gi)"
            ))
        }
        other => return Err(format!("invalid size `{s}`: unknown unit `{other}`")),
    };
    let bytes = mul_decimal(num, mult)
        .ok_or_else(|| format!("invalid size `{s}`: not a whole number of bytes, or too large"))?;
    Ok(bytes)
}

/// Multiplies a non-negative decimal string by `mult` exactly; None on syntax error,
/// overflow or a fractional result.
fn mul_decimal(num: &str, mult: u64) -> Option<u64> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 18 {
        return None;
    }
    let int_v: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let m = u128::from(mult);
    let whole = int_v.checked_mul(m)?;
    let fnum = frac_v.checked_mul(m)?;
    if fnum % scale != 0 {
        return None;
    }
    let total = whole.checked_add(fnum / scale)?;
    u64::try_from(total).ok()
}

/// Parses cpu written as a string: "500m" (millicores) or "0.5" / "2" (cores).
pub(crate) fn parse_cpu_str(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("negative cpu `{s}`"));
    }
    let millis = if let Some(m) = t.strip_suffix('m') {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid cpu `{s}`"));
        }
        m.parse::<u64>()
            .map_err(|_| format!("cpu `{s}` is too large"))?
    } else {
        mul_decimal(t, 1000).ok_or_else(|| {
            format!("invalid cpu `{s}`: expected cores (at most 3 decimals) or millicores")
        })?
    };
    check_cpu_millis(millis, s)
}

/// Cpu written as a number of cores (TOML/YAML float or integer).
pub(crate) fn cpu_from_cores(cores: f64) -> Result<u32, String> {
    if !cores.is_finite() || cores < 0.0 {
        return Err(format!("invalid cpu {cores}"));
    }
    let millis = cores * 1000.0;
    let rounded = millis.round();
    if (millis - rounded).abs() > 1e-6 {
        return Err(format!(
            "cpu {cores} is not a whole number of millicores (at most 3 decimals)"
        ));
    }
    if rounded > f64::from(u32::MAX) {
        return Err(format!("cpu {cores} is too large"));
    }
    // In range and integral, so the cast is exact.
    check_cpu_millis(rounded as u64, &cores.to_string())
}

pub(crate) const MAX_CPU_MILLIS: u64 = 1_024_000;

fn check_cpu_millis(millis: u64, shown: &str) -> Result<u32, String> {
    if millis == 0 {
        return Err(format!("cpu `{shown}` must be greater than zero"));
    }
    if millis > MAX_CPU_MILLIS {
        return Err(format!("cpu `{shown}` is too large (at most 1024 cores)"));
    }
    u32::try_from(millis).map_err(|_| format!("cpu `{shown}` is too large"))
}

/// Checks a stack or service name: `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`.
pub(crate) fn check_name(name: &str, what: &str) -> Result<(), (String, String)> {
    let hint = "names use lowercase letters, digits and '-', start and end with a letter or digit, at most 63 characters (e.g. \"web\", \"api-v2\")".to_string();
    if name.is_empty() {
        return Err((format!("{what} name is empty"), hint));
    }
    if name.contains('/') || name.contains("..") {
        return Err((
            format!("{what} name `{name}` must not contain '/' or '..'"),
            hint,
        ));
    }
    let b = name.as_bytes();
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = b.len() <= 63
        && b.first().is_some_and(|&c| ok_char(c))
        && b.last().is_some_and(|&c| ok_char(c))
        && b.iter().all(|&c| ok_char(c) || c == b'-');
    if valid {
        Ok(())
    } else {
        Err((format!("invalid {what} name `{name}`"), hint))
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`
pub fn is_env_var_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.first()
        .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

pub(crate) const SIGNALS: &[&str] = &["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM"];

/// Normalises "TERM" / "SIGTERM" / "sigterm" to "SIGTERM".
pub(crate) fn normalize_signal(s: &str) -> Option<String> {
    let up = s.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("SIG").unwrap_or(&up);
    SIGNALS
        .iter()
        .find(|&&k| k == bare)
        .map(|k| format!("SIG{k}"))
}

/// Validates an image reference `[host[:port]/]path[:tag][@sha256:<64 hex>]`.
pub(crate) fn check_image(reference: &str) -> Result<(), String> {
    let r = reference;
    if r.is_empty() {
        return Err("image reference is empty".into());
    }
    if r.len() > 512 {
        return Err("image reference is too long".into());
    }
    let (rest, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let hex = d
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("image digest `{d}` must start with `sha256:`"))?;
        if hex.len() != 64 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "image digest `{d}` must be `sha256:` followed by 64 lowercase hex digits"
            ));
        }
    }
    // A tag is after the last ':' that comes after the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest.get(last_slash..).and_then(|t| t.rfind(':')) {
        Some(i) => {
            let at = last_slash + i;
            (
                rest.get(..at).unwrap_or(""),
                Some(rest.get(at + 1..).unwrap_or("")),
            )
        }
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let tb = tag.as_bytes();
        let ok = !tb.is_empty()
            && tb.len() <= 128
            && tb
                .first()
                .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_')
            && tb
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(format!(
                "invalid image tag `{tag}` (letters, digits, '_', '.', '-', at most 128)"
            ));
        }
    }
    if name.is_empty() {
        return Err("image reference has no repository name".into());
    }
    if name.len() > 255 {
        return Err("image repository name is longer than 255 characters".into());
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts.first().copied().unwrap_or("");
        if first.contains('.') || first.contains(':') || first == "localhost" {
            check_registry_host(first)?;
            parts.remove(0);
        }
    }
    for p in parts {
        if !is_path_component(p) {
            return Err(format!(
                "invalid image repository component `{p}` (lowercase letters, digits and single '.', '_', '__' or '-' separators)"
            ));
        }
    }
    Ok(())
}

fn check_registry_host(h: &str) -> Result<(), String> {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("invalid registry port in `{h}`"));
        }
    }
    let ok = !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid registry host `{h}`"))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < b.len() {
        if expect_alnum {
            if !b.get(i).copied().is_some_and(alnum) {
                return false;
            }
            while b.get(i).copied().is_some_and(alnum) {
                i += 1;
            }
            expect_alnum = false;
        } else {
            let start = i;
            match b.get(i) {
                Some(b'.') => i += 1,
                Some(b'_') => {
                    i += 1;
                    if b.get(i) == Some(&b'_') {
                        i += 1;
                    }
                }
                Some(b'-') => {
                    while b.get(i) == Some(&b'-') {
                        i += 1;
                    }
                }
                _ => return false,
            }
            if i == start {
                return false;
            }
            expect_alnum = true;
        }
    }
    !expect_alnum
}

/// Route host: lowercase DNS name, optionally starting with "*.".
pub(crate) fn is_route_host(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.first()
                    .is_some_and(|&c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && b.last()
                    .is_some_and(|&c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && b.iter()
                    .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// Levenshtein distance (small inputs only).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The closest allowed name, if close enough to be a likely typo.
pub(crate) fn suggest<'a>(word: &str, allowed: &[&'a str]) -> Option<&'a str> {
    if word.chars().count() > 64 {
        return None;
    }
    let lw = word.to_ascii_lowercase();
    allowed
        .iter()
        .map(|&a| (edit_distance(&lw, a), a))
        .filter(|&(d, a)| d <= 2.max(a.len() / 3) && d < a.len())
        .min_by_key(|&(d, _)| d)
        .map(|(_, a)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("1h2m3s4ms"), Ok(3_723_004));
        assert_eq!(parse_duration_ms("0"), Ok(0));
        for bad in [
            "",
            "-1s",
            "10",
            "s",
            "1x",
            "1s1m",
            "1s1s",
            "1.5s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("512M"), Ok(512_000_000));
        assert_eq!(parse_size_bytes("100k"), Ok(100_000));
        assert_eq!(parse_size_bytes("1024"), Ok(1024));
        assert_eq!(parse_size_bytes("1.5Gi"), Ok(3 << 29));
        for bad in [
            "",
            "-1M",
            "12q",
            "0.5",
            "1.5",
            "MiB",
            "99999999999T",
            "256mb",
        ] {
            assert!(parse_size_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu_str("500m"), Ok(500));
        assert_eq!(parse_cpu_str("0.5"), Ok(500));
        assert_eq!(parse_cpu_str("2"), Ok(2000));
        assert_eq!(cpu_from_cores(0.25), Ok(250));
        assert_eq!(cpu_from_cores(1.0), Ok(1000));
        for bad in ["", "0", "m", "-1", "0.0001", "abc", "9999999"] {
            assert!(parse_cpu_str(bad).is_err(), "{bad}");
        }
        assert!(cpu_from_cores(-1.0).is_err());
        assert!(cpu_from_cores(0.0001).is_err());
        assert!(cpu_from_cores(f64::NAN).is_err());
    }

    #[test]
    fn names() {
        for ok in ["a", "web", "api-v2", "0", &"a".repeat(63)] {
            assert!(check_name(ok, "service").is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a/b",
            "..",
            "a..b",
            &"a".repeat(64),
        ] {
            assert!(check_name(bad, "service").is_err(), "{bad}");
        }
        assert!(check_name("a/b", "service").unwrap_err().0.contains("'/'"));
    }

    #[test]
    fn env_names() {
        assert!(is_env_var_name("LOG_LEVEL"));
        assert!(is_env_var_name("_x1"));
        assert!(!is_env_var_name("1X"));
        assert!(!is_env_var_name("A-B"));
        assert!(!is_env_var_name(""));
    }

    #[test]
    fn signals() {
        assert_eq!(normalize_signal("TERM").as_deref(), Some("SIGTERM"));
        assert_eq!(normalize_signal("sigterm").as_deref(), Some("SIGTERM"));
        assert_eq!(normalize_signal("SIGUSR1").as_deref(), Some("SIGUSR1"));
        assert_eq!(normalize_signal("SIGFOO"), None);
        assert_eq!(normalize_signal(""), None);
    }

    #[test]
    fn images() {
        let d = format!("@sha256:{}", "a".repeat(64));
        for ok in [
            "nginx".to_string(),
            "nginx:1.25".into(),
            "library/nginx:latest".into(),
            "ghcr.io/owner/app:v1.2.3".into(),
            "localhost:5000/app".into(),
            "registry.example.com:443/a/b/c:tag".into(),
            format!("nginx{d}"),
            format!("nginx:1{d}"),
            "my_app__x-y.z".into(),
        ] {
            assert!(check_image(&ok).is_ok(), "{ok}: {:?}", check_image(&ok));
        }
        for bad in [
            "",
            "Nginx",
            "nginx:",
            "nginx@sha256:abc",
            "nginx@md5:abc",
            "ghcr.io/Owner/app",
            "a//b",
            "nginx:-bad",
            "-x",
            "x_",
            "bad host:1/app",
        ] {
            assert!(check_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        let allowed = ["replicas", "command", "image"];
        assert_eq!(suggest("replica", &allowed), Some("replicas"));
        assert_eq!(suggest("comand", &allowed), Some("command"));
        assert_eq!(suggest("zzzzzzzz", &allowed), None);
    }
}
