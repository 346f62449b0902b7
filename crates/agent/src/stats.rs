//! What the node's tasks use (memory now, CPU time so far), read through each task's driver
//! for the servers' `GET /v1/stats` (`dozen stats`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;

use crate::{Shared, TaskRecord, TASK_RECORD};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `GET /v1/agent/stats` (already authorised): what each task of this node uses, read
/// through its driver.
pub(crate) async fn serve(shared: Arc<Shared>, query: Option<&str>) -> Response<Body> {
    let q: dozen_api::StatsQuery =
        serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    let mut usages = Vec::new();
    for (dir, service, task) in crate::local_tasks(&shared.tasks_dir()) {
        if q.service.as_ref().is_some_and(|s| s != &service) {
            continue;
        }
        let record: Option<TaskRecord> = std::fs::read(dir.join(TASK_RECORD))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let Some(handle) = record.and_then(|r| r.handle) else {
            continue;
        };
        let Some(driver) = shared.drivers.get(&handle.driver) else {
            continue;
        };
        let used = driver.stats(&handle).await;
        usages.push(dozen_api::TaskUsage {
            task,
            service,
            node: shared.config.node_name.clone(),
            driver: handle.driver.clone(),
            memory_bytes: used.memory_bytes,
            cpu_nanos: used.cpu_nanos,
            rss_kib: used.rss_kib,
            overhead_rss_kib: used.overhead_rss_kib,
            at_ms: crate::shim::wall_ms(),
        });
    }
    let bytes = serde_json::to_vec(&usages).unwrap_or_default();
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed(),
    );
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
