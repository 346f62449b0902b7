//! The environment a task sees, as one pure function of its assignment: nothing of the agent's
//! own environment leaks in (factor III: config comes from the stack file alone).

use std::collections::BTreeMap;

use dozen_model::Assignment;

/// `orders` -> `ORDERS_URL`, `order-api` -> `ORDER_API_URL`.
pub fn discovery_var(service: &str) -> String {
    format!("{}_URL", service.to_ascii_uppercase().replace('-', "_"))
}

/// The spec's `env`, then what dozen sets (and a spec cannot override): `PORT` when the task
/// has one, `<NAME>_URL` for each service it `uses` (through the node's proxy at
/// `proxy_internal_url`), and `DOZEN_SERVICE`, `DOZEN_TASK`, `DOZEN_RELEASE`.
pub fn task_env(
    assignment: &Assignment,
    port: Option<u16>,
    proxy_internal_url: &str,
) -> BTreeMap<String, String> {
    let mut env = assignment.spec.env.clone();
    if let Some(port) = port {
        env.insert("PORT".into(), port.to_string());
    }
    let proxy = proxy_internal_url.trim_end_matches('/');
    for other in &assignment.spec.uses {
        env.insert(discovery_var(other), format!("{proxy}/_/{other}"));
    }
    env.insert("DOZEN_SERVICE".into(), assignment.service.clone());
    env.insert("DOZEN_TASK".into(), assignment.task.clone());
    env.insert("DOZEN_RELEASE".into(), assignment.release.to_string());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_sees_its_env_its_port_and_the_services_it_uses() {
        let mut a = crate::testing::assignment("orders-1", "orders");
        a.spec.env.insert("LOG_LEVEL".into(), "debug".into());
        a.spec.env.insert("PORT".into(), "1".into());
        a.spec.uses = vec!["order-api".into()];
        let env = task_env(&a, Some(31000), "http://127.0.0.1:7781/");
        assert_eq!(env["LOG_LEVEL"], "debug");
        assert_eq!(env["PORT"], "31000", "dozen's PORT wins over the spec's");
        assert_eq!(env["ORDER_API_URL"], "http://127.0.0.1:7781/_/order-api");
        assert_eq!(env["DOZEN_SERVICE"], "orders");
        assert_eq!(env["DOZEN_TASK"], "orders-1");
        assert_eq!(env["DOZEN_RELEASE"], "1");
        assert!(!env.contains_key("PATH"), "no PATH from the agent");
        let without_port = task_env(&a, None, "http://127.0.0.1:7781");
        assert_eq!(
            without_port["PORT"], "1",
            "no port: the spec's own value stays"
        );
    }
}
