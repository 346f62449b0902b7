//! `dozen stats [SERVICE]`: what each task uses, memory now and CPU over a short interval
//! (two readings), as each node's agent reads it through the task's driver.

use std::time::Duration;

use clap::Args;
use dozen_api::{StatsQuery, TaskUsage};

use crate::commands::{client, parse_duration};
use crate::{output, Global};

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Only this service's tasks.
    pub service: Option<String>,
    /// How long between the two readings the CPU rate is taken from.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// One task's use, with its CPU rate over the interval.
#[derive(Debug, serde::Serialize)]
struct Row {
    #[serde(flatten)]
    usage: TaskUsage,
    /// Percent of one core over the interval.
    cpu_percent: Option<f64>,
}

pub async fn stats(global: &Global, args: StatsArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let query = StatsQuery {
        service: args.service.clone(),
    };
    let first = api.stats(&query).await?;
    tokio::time::sleep(args.interval.max(Duration::from_millis(100))).await;
    let second = api.stats(&query).await?;
    let rows: Vec<Row> = second
        .into_iter()
        .map(|usage| {
            let before = first.iter().find(|u| u.task == usage.task);
            let cpu_percent = match (before, usage.cpu_nanos) {
                (Some(b), Some(now)) if usage.at_ms > b.at_ms => b.cpu_nanos.map(|then| {
                    let used = now.saturating_sub(then) as f64;
                    let wall = (usage.at_ms - b.at_ms) as f64 * 1e6;
                    (used / wall * 1000.0).round() / 10.0
                }),
                _ => None,
            };
            Row { usage, cpu_percent }
        })
        .collect();
    if rows.is_empty() {
        if let Some(service) = &args.service {
            eprintln!("no running task of `{service}` (`dozen ps` lists services)");
        }
    }
    output::listing(global.output, &rows, || {
        let mib = |b: Option<u64>| {
            b.map(|b| format!("{:.1} MiB", b as f64 / 1_048_576.0))
                .unwrap_or_else(|| "-".into())
        };
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.usage.task.clone(),
                    r.usage.service.clone(),
                    r.usage.node.clone(),
                    r.usage.driver.clone(),
                    r.cpu_percent
                        .map(|p| format!("{p:.1}%"))
                        .unwrap_or_else(|| "-".into()),
                    mib(r.usage.memory_bytes),
                    r.usage
                        .rss_kib
                        .map(|k| mib(Some(k * 1024)))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        output::table(
            &[
                "TASK", "SERVICE", "NODE", "DRIVER", "CPU", "MEMORY", "MAIN RSS",
            ],
            &table,
        );
    });
    Ok(0)
}
