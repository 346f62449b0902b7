//! `[services.X.health]`: the three kinds of check and their timings.

use crate::node::Entry;
use crate::types::*;
use crate::units::*;

use super::{entries, unknown_key, Validator, HEALTH_KEYS};

impl Validator {
    pub(super) fn health(&mut self, e: &Entry) -> Option<HealthCheck> {
        let before = self.diags.len();
        let mut kinds: Vec<(&Entry, HealthKind)> = Vec::new();
        let mut hc = HealthCheck {
            kind: HealthKind::Tcp,
            interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            grace_period_ms: 0,
        };
        let mut interval_loc = None;
        let mut timeout_loc = None;
        for h in entries(&e.node) {
            match h.key.as_str() {
                "http" => {
                    if let Some(p) = self.str_of(h, "\"/healthz\"") {
                        if p.starts_with('/') {
                            kinds.push((
                                h,
                                HealthKind::Http {
                                    path: p.to_string(),
                                },
                            ));
                        } else {
                            self.err(
                                h.node.loc,
                                format!("health check path `{p}` must start with '/'"),
                                format!("write e.g. {}", self.syn.ex("http", "\"/healthz\"")),
                            );
                        }
                    }
                }
                "tcp" => {
                    if let Some(b) = self.bool_of(h) {
                        if b {
                            kinds.push((h, HealthKind::Tcp));
                        }
                    }
                }
                "command" => {
                    if let Some(c) = self.command_of(h) {
                        kinds.push((h, HealthKind::Command { argv: c.argv() }));
                    }
                }
                "interval" => {
                    if let Some(ms) = self.duration_of(h) {
                        if ms == 0 {
                            self.err(
                                h.node.loc,
                                "health `interval` must be greater than zero",
                                DURATION_EXAMPLES,
                            );
                        } else {
                            hc.interval_ms = ms;
                            interval_loc = Some(h.node.loc);
                        }
                    }
                }
                "timeout" => {
                    if let Some(ms) = self.duration_of(h) {
                        if ms == 0 {
                            self.err(
                                h.node.loc,
                                "health `timeout` must be greater than zero",
                                DURATION_EXAMPLES,
                            );
                        } else {
                            hc.timeout_ms = ms;
                            timeout_loc = Some(h.node.loc);
                        }
                    }
                }
                "grace_period" => {
                    if let Some(ms) = self.duration_of(h) {
                        hc.grace_period_ms = ms;
                    }
                }
                "healthy_threshold" | "unhealthy_threshold" => {
                    if let Some(n) = self.int_of(h, "3") {
                        match u32::try_from(n) {
                            Ok(n) if n >= 1 => {
                                if h.key == "healthy_threshold" {
                                    hc.healthy_threshold = n;
                                } else {
                                    hc.unhealthy_threshold = n;
                                }
                            }
                            _ => self.err(
                                h.node.loc,
                                format!("`{}` = {n} must be at least 1", h.key),
                                format!("write e.g. {}", self.syn.ex(&h.key, "3")),
                            ),
                        }
                    }
                }
                _ => self.diags.push(unknown_key(h, HEALTH_KEYS, "in `health`")),
            }
        }
        match kinds.len() {
            0 => {
                if self.diags.len() == before {
                    self.err(
                        e.key_loc,
                        "health check has no kind",
                        format!(
                            "set exactly one of {}, {} or {}",
                            self.syn.ex("http", "\"/healthz\""),
                            self.syn.ex("tcp", "true"),
                            self.syn.ex("command", "\"./check\"")
                        ),
                    );
                }
            }
            1 => {
                if let Some((_, k)) = kinds.pop() {
                    hc.kind = k;
                }
            }
            _ => {
                let names: Vec<&str> = kinds.iter().map(|(e, _)| e.key.as_str()).collect();
                let loc = kinds
                    .iter()
                    .map(|(e, _)| e.key_loc)
                    .max()
                    .unwrap_or(e.key_loc);
                self.err(
                    loc,
                    format!("health check sets several kinds: {}", names.join(", ")),
                    "set exactly one of `http`, `tcp` or `command`",
                );
            }
        }
        // A timeout left unset follows a shorter interval: half of it.
        if timeout_loc.is_none() && hc.timeout_ms >= hc.interval_ms {
            hc.timeout_ms = (hc.interval_ms / 2).max(1);
        }
        if hc.timeout_ms >= hc.interval_ms {
            let loc = timeout_loc.or(interval_loc).unwrap_or(e.key_loc);
            self.err(
                loc,
                format!(
                    "health `timeout` ({}ms) must be shorter than `interval` ({}ms)",
                    hc.timeout_ms, hc.interval_ms
                ),
                "lower the timeout or raise the interval, e.g. interval \"5s\" with timeout \"2s\"",
            );
        }
        if self.diags.len() > before {
            None
        } else {
            Some(hc)
        }
    }
}
