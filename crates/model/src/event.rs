//! Events: the user-facing record of what happened to services, tasks and nodes, and why.
//!
//! One enum names every kind; each event says who decided or saw it. Written on change (a
//! transition, never a repeat of the same probe result), kept with a bound per subject and an
//! age limit, under their own root ([`keys::EVENTS`]) so that writing one wakes no controller
//! and grows no snapshot.

use serde::{Deserialize, Serialize};

use crate::SCHEMA;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Event {
    pub schema: u32,
    /// Wall time it happened, in milliseconds.
    pub at_ms: u64,
    /// The service it concerns; None for a node or the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Who decided or saw it: `controller`, `agent <node>`, `operator`, `server <id>`.
    pub by: String,
    #[serde(flatten)]
    pub kind: EventKind,
}
crate::record!(Event, "event");

/// What happened. The sentence a user reads is [`EventKind::describe`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    ReleaseCreated {
        release: u64,
    },
    Scaled {
        from: u32,
        to: u32,
    },
    /// Placed on the event's node, for the reason `why`.
    Placed {
        why: String,
    },
    /// No node can take a task; `reason` names what is missing (a driver, room, any node).
    Unplaceable {
        reason: String,
    },
    Started {
        pid: Option<u32>,
    },
    StartFailed {
        error: String,
    },
    /// A health check failed enough times in a row to count: the probe and its answer.
    HealthCheckFailed {
        answer: String,
        failures: u32,
        threshold: u32,
    },
    OutOfRouting {
        reason: String,
    },
    /// Every task of the service fails its health check: the proxies send to all of them.
    FailingOpen,
    BackInRouting,
    Draining {
        reason: String,
    },
    Stopped {
        reason: String,
    },
    /// `last_line`: the last line the task wrote to stderr (or stdout), which usually says why.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        oom: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_line: Option<String>,
    },
    Restarting {
        backoff_ms: u64,
        restarts: u32,
    },
    NodeDown,
    NodeUp,
    LeaderChanged {
        server: String,
    },
    /// A parameter's expiry is near.
    ParamExpiring {
        name: String,
        expires_at_ms: u64,
    },
    /// A parameter expired: reads of it are refused until a new version is put.
    ParamExpired {
        name: String,
    },
}

impl EventKind {
    /// The sentence shown by `events`, `ps` and a failed wait.
    pub fn describe(&self) -> String {
        match self {
            EventKind::ReleaseCreated { release } => format!("release #{release} created"),
            EventKind::Scaled { from, to } => format!("scaled from {from} to {to}"),
            EventKind::Placed { why } => format!("placed ({why})"),
            // The scheduler's own sentence: "cannot place a task needing …: …".
            EventKind::Unplaceable { reason } => reason.clone(),
            EventKind::Started { pid: Some(pid) } => format!("started (pid {pid})"),
            EventKind::Started { pid: None } => "started".into(),
            EventKind::StartFailed { error } => format!("start failed: {error}"),
            EventKind::HealthCheckFailed {
                answer,
                failures,
                threshold,
            } => format!("health check failed ({failures} of {threshold}): {answer}"),
            EventKind::OutOfRouting { reason } => format!("out of routing: {reason}"),
            EventKind::FailingOpen => {
                "every task fails its health check: the proxies send to all of them (fail open)"
                    .into()
            }
            EventKind::BackInRouting => "healthy again: back in routing".into(),
            EventKind::Draining { reason } => {
                format!("draining ({reason}): out of routing, finishing its requests")
            }
            EventKind::Stopped { reason } => format!("stopped: {reason}"),
            EventKind::Exited {
                code,
                signal,
                oom,
                last_line,
            } => {
                let how = match (code, signal) {
                    (Some(code), _) => format!("exited with code {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    (None, None) => "ended (status unknown)".into(),
                };
                match (oom, last_line) {
                    (true, _) => format!("{how}: out of memory (raise `resources.memory`)"),
                    (false, Some(line)) => format!("{how}: {line}"),
                    (false, None) => how,
                }
            }
            EventKind::Restarting {
                backoff_ms,
                restarts,
            } => format!("restarting in {backoff_ms} ms (restart {restarts}, crash backoff)"),
            EventKind::NodeDown => "node down: its heartbeats stopped".into(),
            EventKind::NodeUp => "node up".into(),
            EventKind::LeaderChanged { server } => format!("{server} leads the controllers"),
            EventKind::ParamExpiring {
                name,
                expires_at_ms,
            } => format!(
                "parameter {name} expires at {}: put a new version before then",
                crate::utc_time(*expires_at_ms)
            ),
            EventKind::ParamExpired { name } => {
                format!("parameter {name} expired: reads are refused until a new version is put")
            }
        }
    }

    /// Whether it explains why something is not running as asked.
    pub fn is_problem(&self) -> bool {
        matches!(
            self,
            EventKind::Unplaceable { .. }
                | EventKind::StartFailed { .. }
                | EventKind::HealthCheckFailed { .. }
                | EventKind::OutOfRouting { .. }
                | EventKind::FailingOpen
                | EventKind::Exited { .. }
                | EventKind::Restarting { .. }
                | EventKind::NodeDown
                | EventKind::ParamExpiring { .. }
                | EventKind::ParamExpired { .. }
        )
    }
}

impl Event {
    /// The sentence shown by `events`, `ps` and a failed wait.
    pub fn describe(&self) -> String {
        match (&self.kind, &self.node) {
            (EventKind::Placed { why }, Some(node)) => format!("placed on {node} ({why})"),
            (kind, _) => kind.describe(),
        }
    }

    pub fn new(at_ms: u64, by: impl Into<String>, kind: EventKind) -> Event {
        Event {
            schema: SCHEMA,
            at_ms,
            service: None,
            task: None,
            node: None,
            by: by.into(),
            kind,
        }
    }
    pub fn service(mut self, service: impl Into<String>) -> Event {
        self.service = Some(service.into());
        self
    }
    pub fn task(mut self, task: impl Into<String>) -> Event {
        self.task = Some(task.into());
        self
    }
    pub fn node(mut self, node: impl Into<String>) -> Event {
        self.node = Some(node.into());
        self
    }
    /// The subject its retention counts against: its service, else `_nodes` or `_cluster`.
    pub fn subject(&self) -> String {
        match (&self.service, &self.node) {
            (Some(service), _) => service.clone(),
            (None, Some(_)) => "_nodes".into(),
            (None, None) => "_cluster".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_sentences_and_round_trip() {
        let e = Event::new(
            7,
            "agent n1",
            EventKind::StartFailed {
                error: "cannot start `./nope`: No such file or directory".into(),
            },
        )
        .service("web")
        .task("web-1");
        assert_eq!(
            e.kind.describe(),
            "start failed: cannot start `./nope`: No such file or directory"
        );
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""kind":"start_failed""#), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        assert_eq!(e.subject(), "web");
        assert!(e.kind.is_problem());
    }

    /// Every kind survives a round trip with every field of the event set: a kind's field
    /// named like one of the event's own would be lost (the kind is flattened into it).
    #[test]
    fn every_kind_round_trips_inside_a_full_event() {
        let kinds = [
            EventKind::ReleaseCreated { release: 3 },
            EventKind::Scaled { from: 1, to: 2 },
            EventKind::Placed { why: "room".into() },
            EventKind::Unplaceable {
                reason: "no node".into(),
            },
            EventKind::Started { pid: Some(9) },
            EventKind::StartFailed {
                error: "nope".into(),
            },
            EventKind::HealthCheckFailed {
                answer: "500".into(),
                failures: 3,
                threshold: 3,
            },
            EventKind::OutOfRouting {
                reason: "sick".into(),
            },
            EventKind::FailingOpen,
            EventKind::BackInRouting,
            EventKind::Draining {
                reason: "scaled in".into(),
            },
            EventKind::Stopped {
                reason: "scale".into(),
            },
            EventKind::Exited {
                code: Some(1),
                signal: None,
                oom: true,
                last_line: Some("boom".into()),
            },
            EventKind::Restarting {
                backoff_ms: 500,
                restarts: 2,
            },
            EventKind::NodeDown,
            EventKind::NodeUp,
            EventKind::LeaderChanged {
                server: "s1".into(),
            },
        ];
        for kind in kinds {
            let e = Event::new(1, "controller", kind)
                .service("web")
                .task("web-1")
                .node("n1");
            let json = serde_json::to_vec(&e).unwrap();
            assert_eq!(crate::decode::<Event>("k", &json).unwrap(), e);
        }
    }
}
