//! `dozen run`: a one-off task of a service's current release, its output as it comes, and its
//! exit code as the command's.

use std::time::Duration;

use dozen_api::{LogLine, LogQuery, LogStream, TaskInfo};
use futures_util::StreamExt;

use crate::commands::{client, RunArgs};
use crate::{Global, Output};

pub async fn run(global: &Global, args: RunArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let task: TaskInfo = api.run(&args.service, args.command.clone()).await?;
    let id = task.task.clone();
    let output = global.output;
    let query = LogQuery {
        task: Some(id.clone()),
        follow: true,
        ..LogQuery::default()
    };
    // Print output as it comes; after the task ends, print whatever the stream had not yet.
    let printed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let follower = {
        let api = api.clone();
        let printed = printed.clone();
        tokio::spawn(async move {
            let Ok(mut stream) = api.logs(&query).await else {
                return;
            };
            while let Some(Ok(line)) = stream.next().await {
                print_run_line(&line, output);
                printed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let finished = loop {
        let t: TaskInfo = api.task(&id).await?;
        if let Some(st) = t.status.as_ref().filter(|s| s.state.is_terminal()) {
            break st.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    follower.abort();
    let _ = follower.await;
    let all: Vec<LogLine> = {
        let q = LogQuery {
            task: Some(id.clone()),
            ..LogQuery::default()
        };
        let mut s = api.logs(&q).await?;
        let mut v = Vec::new();
        while let Some(l) = s.next().await {
            v.push(l?);
        }
        v
    };
    for line in all
        .iter()
        .skip(printed.load(std::sync::atomic::Ordering::SeqCst))
    {
        print_run_line(line, output);
    }
    let _ = api.remove_task(&id).await;
    let code = match (finished.exit_code, finished.signal) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => {
            eprintln!(
                "error: {}",
                finished
                    .message
                    .unwrap_or_else(|| "the task ended without an exit status".into())
            );
            1
        }
    };
    Ok(code)
}

fn print_run_line(line: &LogLine, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::to_string(line).unwrap_or_default()),
        Output::Table if line.stream == LogStream::Stderr => eprintln!("{}", line.line),
        Output::Table => println!("{}", line.line),
    }
}
