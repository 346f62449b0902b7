//! `dozen events`: what happened to services, tasks and nodes, and why, oldest first.

use std::time::Duration;

use clap::Args;
use dozen_api::EventQuery;
use dozen_model::Event;
use futures_util::StreamExt;

use crate::commands::{client, parse_duration};
use crate::{Global, Output};

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only this service's events (default: every service, node and the cluster).
    pub service: Option<String>,
    /// Only this task's events.
    #[arg(long)]
    pub task: Option<String>,
    /// Only events newer than this, e.g. 10m, 1h, 30s.
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Keep printing new events as they are recorded.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

pub async fn events(global: &Global, args: EventsArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let query = EventQuery {
        service: args.service.clone(),
        task: args.task.clone(),
        since_ms: args
            .since
            .map(|d| dozen_agent::shim::wall_ms().saturating_sub(d.as_millis() as u64)),
        follow: args.follow,
    };
    let mut stream = api.events(&query).await?;
    let mut printed = 0usize;
    while let Some(event) = stream.next().await {
        print_event(&event?, global.output);
        printed += 1;
    }
    if printed == 0 && global.output == Output::Table && !args.follow {
        eprintln!(
            "no events{}",
            match &args.service {
                Some(s) => format!(" for `{s}` (is it a service? `dozen ps` lists them)"),
                None => String::new(),
            }
        );
    }
    Ok(0)
}

/// One line: when, what it concerns, what happened, who saw it.
pub fn print_event(event: &Event, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::to_string(event).unwrap_or_default()),
        Output::Table => println!("{}", line(event)),
    }
}

pub fn line(event: &Event) -> String {
    let subject = match (&event.service, &event.task, &event.node) {
        (_, Some(task), _) => task.clone(),
        (Some(service), None, _) => service.clone(),
        (None, None, Some(node)) => format!("node {node}"),
        (None, None, None) => "cluster".into(),
    };
    format!(
        "{}  {subject}  {}  ({})",
        crate::output::utc_time(event.at_ms),
        event.describe(),
        event.by
    )
}
