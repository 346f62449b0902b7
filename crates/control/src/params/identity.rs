//! Task identities: the token a task (and its agent, to fetch its secrets) presents, and
//! what it allows: reading the secrets its release pinned, and whatever the service's
//! `access` grants. A token names its task; it opens nothing once the task is no longer
//! assigned to run, whatever its expiry says.

use dozen_model::{decode, keys, Assignment, DesiredState};
use dozen_params::identity::{self, TaskClaims};
use dozen_params::policy::{Permission, Policy};

use super::ParamStore;
use crate::{ControlError, Result};

/// How long a task token lives; agents renew it at half that while the task runs.
pub const TASK_TOKEN_TTL_MS: u64 = 3600 * 1000;

impl ParamStore {
    async fn live_assignment(&self, node: &str, task: &str) -> Result<Option<Assignment>> {
        let Some(kv) = self.store().get(&keys::assignment(node, task)).await? else {
            return Ok(None);
        };
        let a: Assignment = decode(&kv.key, &kv.value)?;
        Ok((a.desired != DesiredState::Stop).then_some(a))
    }

    /// A token for task `task` of node `node`, which must be assigned to run there.
    pub async fn issue_task_token(
        &self,
        node: &str,
        task: &str,
        ttl_ms: u64,
    ) -> Result<(String, u64)> {
        let assignment = self
            .live_assignment(node, task)
            .await?
            .ok_or_else(|| {
                ControlError::Absent(format!(
                    "task {task} is not assigned to run on node {node}; only its own node's agent gets its identity"
                ))
            })?;
        let expires_at_ms = crate::wall_ms() + ttl_ms.clamp(1000, TASK_TOKEN_TTL_MS);
        let claims = TaskClaims {
            node: node.to_string(),
            task: task.to_string(),
            service: assignment.service,
            stack: assignment.stack,
            expires_at_ms,
        };
        Ok((identity::mint(&self.task_key, &claims), expires_at_ms))
    }

    /// Who a task token names and what it may do, if it is valid and its task still runs:
    /// the service's `access` grants, and the exact versions its release pinned.
    pub async fn task_caller(&self, token: &str) -> Result<Option<TaskIdentity>> {
        let Some(claims) = identity::open(&self.task_key, token, crate::wall_ms()) else {
            return Ok(None);
        };
        let Some(assignment) = self.live_assignment(&claims.node, &claims.task).await? else {
            return Ok(None);
        };
        let mut permissions: Vec<Permission> = assignment
            .spec
            .access
            .iter()
            .filter_map(|text| match Permission::parse(text) {
                Ok(p @ Permission::Param { .. }) => Some(p),
                _ => None,
            })
            .collect();
        permissions.sort();
        permissions.dedup();
        Ok(Some(TaskIdentity {
            claims,
            access: Policy(permissions),
            pinned: assignment
                .secrets
                .values()
                .map(|p| (p.name.clone(), p.version))
                .collect(),
        }))
    }
}

/// What a valid task token stands for.
pub struct TaskIdentity {
    pub claims: TaskClaims,
    /// What the service's `access` grants.
    pub access: Policy,
    /// The secrets its release pinned: these versions, and no other, besides `access`.
    pub pinned: Vec<(String, u64)>,
}
