//! `dozen routes`: the rules proxies serve, in the order they try them; `dozen routes test`:
//! which rule a request would meet, and why each one before it did not. Both read the table
//! proxies read and evaluate it with the proxy's own matcher.

use clap::{Args, Subcommand};
use dozen_model::RouteTable;
use dozen_proxy::table::{Action, Request, Rule, Table};
use dozen_spec::RouteAction;
use serde::Serialize;

use crate::commands::client;
use crate::output::{self, table};
use crate::{Global, Output};

#[derive(Args, Debug)]
pub struct RoutesArgs {
    #[command(subcommand)]
    command: Option<RoutesCommand>,
}

#[derive(Subcommand, Debug)]
enum RoutesCommand {
    /// Which rule a request would meet, and why each rule tried before it did not:
    /// `dozen routes test http://shop.local/api/items -H 'x-canary: on'`.
    Test(TestArgs),
}

#[derive(Args, Debug)]
struct TestArgs {
    /// The request's URL (`http://host[:port]/path?query`; a bare `/path` means any host).
    url: String,
    /// A request header, `Name: value` (repeat it for more).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The request's method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// The client's address, for rules with `source`.
    #[arg(long, default_value = "127.0.0.1")]
    from: std::net::IpAddr,
    /// As a request on the internal listener (service to service), which serves internal
    /// rules and `/_/<service>` too.
    #[arg(long)]
    internal: bool,
}

pub async fn routes(global: &Global, args: RoutesArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let fetched: RouteTable = api
        .routes(&dozen_api::RouteQuery {
            after: None,
            wait_ms: None,
        })
        .await?;
    let compiled = Table::new(fetched.clone());
    match args.command {
        None => {
            list(global.output, &compiled, &fetched);
            Ok(0)
        }
        Some(RoutesCommand::Test(t)) => test(global.output, &compiled, t),
    }
}

/// A rule as listed.
#[derive(Serialize)]
struct Listed<'a> {
    order: usize,
    service: &'a str,
    stack: &'a str,
    rule: &'a dozen_spec::Route,
    action: String,
}

fn action_text(rule: &Rule) -> String {
    match &rule.action {
        Action::Forward { groups, .. } => {
            let total: u32 = groups.iter().map(|(_, w)| *w).sum();
            let parts: Vec<String> = groups
                .iter()
                .map(|(g, w)| {
                    let share = if groups.len() > 1 && total > 0 {
                        format!(" {}%", (u64::from(*w) * 100 / u64::from(total)))
                    } else {
                        String::new()
                    };
                    format!("→ {}{share} ({} targets)", g.name, g.targets.len())
                })
                .collect();
            if parts.is_empty() {
                "→ nothing (no target group)".into()
            } else {
                parts.join(", ")
            }
        }
        Action::Redirect(r) => {
            let mut to = Vec::new();
            for (what, v) in [
                ("scheme", r.scheme.clone()),
                ("host", r.host.clone()),
                ("port", r.port.map(|p| p.to_string())),
                ("path", r.path.clone()),
                ("query", r.query.clone()),
            ] {
                if let Some(v) = v {
                    to.push(format!("{what}={v}"));
                }
            }
            format!("redirect {} {}", r.status, to.join(" "))
        }
        Action::Respond(f) => format!("respond {} ({} bytes)", f.status, f.body.len()),
    }
}

fn list(out: Output, compiled: &Table, fetched: &RouteTable) {
    let listed: Vec<Listed> = compiled
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| Listed {
            order: i + 1,
            service: &r.service,
            stack: &r.stack,
            rule: &r.spec,
            action: action_text(r),
        })
        .collect();
    #[derive(Serialize)]
    struct Listing<'a> {
        revision: u64,
        rules: Vec<Listed<'a>>,
        groups: &'a [dozen_model::TargetGroup],
    }
    let listing = Listing {
        revision: fetched.revision,
        rules: listed,
        groups: &fetched.groups,
    };
    output::listing(out, &listing, || {
        let rows: Vec<Vec<String>> = compiled
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    (i + 1).to_string(),
                    r.spec.priority.map_or("-".into(), |p| p.to_string()),
                    r.spec.describe(),
                    if r.spec.internal {
                        "internal"
                    } else {
                        "public"
                    }
                    .into(),
                    action_text(r),
                    format!("{}/{}", r.stack, r.service),
                ]
            })
            .collect();
        table(
            &["#", "PRIORITY", "RULE", "LISTENER", "ACTION", "DECLARED BY"],
            &rows,
        );
        println!(
            "\nrules are tried in this order; the first whose every condition holds is the request's ({} rules at store revision {})",
            compiled.rules.len(),
            fetched.revision
        );
    });
}

/// What `routes test` found.
#[derive(Serialize)]
struct Tested<'a> {
    matched: Option<Listed<'a>>,
    /// Rules tried before it, with why each did not match.
    missed: Vec<(String, String)>,
}

fn test(out: Output, compiled: &Table, t: TestArgs) -> anyhow::Result<i32> {
    let (scheme, host, rest) = match t.url.split_once("://") {
        Some((scheme, rest)) if scheme == "http" || scheme == "https" => {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            (scheme, host.to_string(), path.to_string())
        }
        Some((scheme, _)) => anyhow::bail!(
            "`{}`: the proxy serves http and https, not {scheme}; write e.g. http://shop.local/api",
            t.url
        ),
        None if t.url.starts_with('/') => ("http", "*".to_string(), t.url.clone()),
        None => anyhow::bail!(
            "`{}` is not a URL: write e.g. http://shop.local/api/items or /api/items",
            t.url
        ),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (rest, None),
    };
    let mut headers = hyper::HeaderMap::new();
    for h in &t.headers {
        let Some((name, value)) = h.split_once(':') else {
            anyhow::bail!("header `{h}` has no `:`; write it as `Name: value`");
        };
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| anyhow::anyhow!("`{}` is not a header name", name.trim()))?;
        let value = hyper::header::HeaderValue::from_str(value.trim()).map_err(|_| {
            anyhow::anyhow!("the value of header `{name}` has bytes a header cannot")
        })?;
        headers.append(name, value);
    }
    let method = t.method.to_ascii_uppercase();
    let req = Request {
        scheme,
        host: &host,
        path: &path,
        query: query.as_deref(),
        method: &method,
        headers: &headers,
        client: t.from,
        internal: t.internal,
    };
    let explained = compiled.explain(&req);
    let mut tested = Tested {
        matched: None,
        missed: Vec::new(),
    };
    for (i, (rule, m)) in explained.iter().enumerate() {
        match m {
            Ok(()) => {
                tested.matched = Some(Listed {
                    order: compiled
                        .rules
                        .iter()
                        .position(|r| std::ptr::eq(r, *rule))
                        .unwrap_or(i)
                        + 1,
                    service: &rule.service,
                    stack: &rule.stack,
                    rule: &rule.spec,
                    action: action_text(rule),
                })
            }
            Err(why) => tested.missed.push((
                format!("{}/{}: {}", rule.stack, rule.service, rule.spec.describe()),
                why.to_string(),
            )),
        }
    }
    // As the proxy does: a discovery URL reaches that service or nothing.
    let discovery = path
        .strip_prefix("/_/")
        .filter(|_| t.internal)
        .map(|name| name.split('/').next().unwrap_or(name).to_string());
    if let Some(name) = &discovery {
        let to_service = explained
            .last()
            .is_some_and(|(rule, m)| m.is_ok() && rule.strip_prefix);
        if !to_service {
            tested.matched = None;
            if out == Output::Json {
                output::json(&tested);
            } else {
                println!("no service `{name}`: `/_/<service>` reaches a service by name, and the proxy answers 404");
            }
            return Ok(1);
        }
    }
    let found = tested.matched.is_some();
    if out == Output::Json {
        output::json(&tested);
    } else {
        for (rule, why) in &tested.missed {
            println!("  no   {rule}: {why}");
        }
        match &tested.matched {
            Some(m) => {
                println!("  YES  {}/{}: {}", m.stack, m.service, m.rule.describe());
                println!(
                    "\n{} {} matches rule #{} of service `{}`: {}",
                    method, t.url, m.order, m.service, m.action
                );
                if let RouteAction::Forward { .. } = m.rule.action {
                    if m.rule.path.starts_with("/_/") {
                        println!(
                            "(the discovery route: the path is sent without `{}`)",
                            m.rule.path
                        );
                    }
                }
            }
            None => println!(
                "\nno rule matches {} {}: the proxy answers 404{}",
                method,
                t.url,
                if t.internal {
                    ""
                } else {
                    " (add --internal to test as a service calling through the internal listener)"
                }
            ),
        }
    }
    Ok(if found { 0 } else { 1 })
}
