//! The parameter store's routes: each checks the caller's policy for the parameter at hand,
//! does the work through `dozen_control::params`, and writes the audit record before it
//! answers. A request whose record cannot be written is refused (503), as Vault does.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use dozen_api::params::{
    AuditQuery, AuditRecord, AuditVerification, CreateTokenRequest, CreatedToken, KeyView,
    LabelRequest, ParamListQuery, ParamNameQuery, ParamPage, ParamQuery, ParamView,
    PutParamRequest, RewrapResponse, RotateKeyRequest, TaskToken, TaskTokenRequest, TokenView,
};
use dozen_control::audit::{AuditFilter, AuditLog};
use dozen_control::params::{tokens, ParamStore, PutParam, Reveal};
use dozen_control::ControlError;
use dozen_params::audit::{Event as AuditEvent, Outcome};
use dozen_params::names::{self, ParamType, Reference};
use dozen_params::policy::{Action, Policy};

use crate::error::{bad_request, error, ApiFailure, ApiResult, SizedJson};
use crate::{AppState, Caller, ConnectionInfo};

/// What every handler here needs: the store, the trail, and who is asking from where.
pub(crate) struct Ask<'a> {
    params: &'a ParamStore,
    audit: Arc<AuditLog>,
    caller: &'a Caller,
    from: String,
}

/// Most bytes of a caller-given text an audit record keeps (a name, a reason).
const MAX_AUDITED_TEXT: usize = 1024;

pub(crate) fn clip(text: &str) -> String {
    if text.len() <= MAX_AUDITED_TEXT {
        return text.to_string();
    }
    let mut end = MAX_AUDITED_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Reads this server's audit files off the runtime's threads.
async fn read_trail<T: Send + 'static>(
    s: &AppState,
    read: impl FnOnce(&AuditLog) -> std::io::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let audit = s
        .audit
        .clone()
        .ok_or_else(|| unavailable("an audit trail"))?;
    let internal = |message: String| {
        ApiFailure::from_response(error(StatusCode::INTERNAL_SERVER_ERROR, message, None))
    };
    tokio::task::spawn_blocking(move || read(&audit))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(format!("cannot read the audit trail: {e}")))
}

/// The audit target of a change: what it made (`name:version`), or what was asked.
fn made<T>(result: &Result<T, ControlError>, of: impl Fn(&T) -> String, asked: &str) -> String {
    match result {
        Ok(value) => of(value),
        Err(_) => asked.to_string(),
    }
}

fn unavailable(what: &str) -> ApiFailure {
    ApiFailure::from_response(error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("this server runs without {what}"),
        None,
    ))
}

fn ask<'a>(
    s: &'a AppState,
    caller: &'a Caller,
    connection: Option<&ConnectionInfo>,
) -> ApiResult<Ask<'a>> {
    Ok(Ask {
        params: s
            .params
            .as_deref()
            .ok_or_else(|| unavailable("a parameter store"))?,
        audit: s
            .audit
            .clone()
            .ok_or_else(|| unavailable("an audit trail"))?,
        caller,
        from: connection
            .map(|c| c.peer.to_string())
            .unwrap_or_else(|| "local".into()),
    })
}

impl Ask<'_> {
    fn event(
        &self,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: Option<String>,
    ) -> AuditEvent {
        AuditEvent {
            at_ms: dozen_control::wall_ms(),
            who: clip(&self.caller.who()),
            from: self.from.clone(),
            action: action.into(),
            target: clip(target),
            outcome,
            detail: detail.as_deref().map(clip),
        }
    }

    /// Writes the record; an answer waits for this.
    async fn audit(
        &self,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: Option<String>,
    ) -> ApiResult<()> {
        // A client that goes away cannot cancel a record once asked for (see `record`).
        self.audit
            .record(self.event(action, target, outcome, detail))
            .await
            .map(|_| ())
            .map_err(|e| {
                tracing::error!(error = %e, "audit trail write failed");
                ApiFailure::from_response(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.to_string(),
                    None,
                ))
            })
    }

    /// Refuses (403), with the record of the refusal written first.
    async fn deny(&self, action: &str, target: &str, reason: String) -> ApiFailure {
        if let Err(e) = self
            .audit(action, target, Outcome::Denied, Some(reason.clone()))
            .await
        {
            return e;
        }
        ApiFailure::from_response(error(StatusCode::FORBIDDEN, reason, None))
    }

    async fn need(&self, action: Action, name: &str, audit_action: &str) -> ApiResult<()> {
        let policy = self.caller.policy();
        if policy.may(action, name) {
            return Ok(());
        }
        let reason = policy.denial(&self.caller.who(), action, name);
        Err(self.deny(audit_action, name, reason).await)
    }

    async fn need_admin(&self, audit_action: &str, target: &str) -> ApiResult<()> {
        let policy = self.caller.policy();
        if policy.is_admin() {
            return Ok(());
        }
        let reason = format!(
            "{} may not {audit_action}: that needs the permission `admin` (it has {})",
            self.caller.who(),
            policy.describe()
        );
        Err(self.deny(audit_action, target, reason).await)
    }

    /// Puts a change on the record before it is made: a change that cannot be audited is
    /// refused (503) and not made. Its outcome is a second record ([`Ask::finish`]).
    async fn asked(&self, action: &str, target: &str) -> ApiResult<()> {
        self.audit(action, target, Outcome::Asked, None).await
    }

    /// Audits the outcome of a change, then answers it.
    async fn finish<T>(
        &self,
        action: &str,
        target: &str,
        result: Result<T, ControlError>,
    ) -> ApiResult<T> {
        match result {
            Ok(value) => {
                self.audit(action, target, Outcome::Ok, None).await?;
                Ok(value)
            }
            Err(e) => {
                self.audit(action, target, Outcome::Failed, Some(e.to_string()))
                    .await?;
                Err(e.into())
            }
        }
    }
}

pub(crate) async fn put(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Json(req): Json<PutParamRequest>,
) -> ApiResult<Json<ParamView>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    names::check_name(&req.name).map_err(|e| bad_request(e.0))?;
    let kind = match &req.kind {
        Some(kind) => Some(ParamType::parse(kind).map_err(|e| bad_request(e.0))?),
        None => None,
    };
    a.need(Action::Write, &req.name, "param.write").await?;
    let put = PutParam {
        name: req.name.clone(),
        kind,
        value: req.value,
        description: req.description,
        tags: req.tags,
        expires_at_ms: req.expires_at_ms,
        warn_before_ms: req.warn_before_ms,
        key: req.key,
    };
    a.asked("param.write", &req.name).await?;
    let result = a.params.put(put, &caller.who()).await;
    let target = made(&result, |v| format!("{}:{}", v.name, v.version), &req.name);
    Ok(Json(a.finish("param.write", &target, result).await?))
}

pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Query(q): Query<ParamQuery>,
) -> ApiResult<SizedJson<ParamView>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    let reference = Reference::parse(&q.name).map_err(|e| bad_request(e.0))?;
    let policy = caller.policy();
    let version = match reference.selector {
        dozen_params::names::Selector::Version(v) => Some(v),
        _ => None,
    };
    let reveal =
        if policy.may(Action::Read, &reference.name) || caller.pinned(&reference.name, version) {
            if q.decrypt {
                Reveal::Decrypted
            } else {
                Reveal::Plain
            }
        } else if policy.may_read_state() && !q.decrypt {
            Reveal::Nothing
        } else {
            let mut reason = policy.denial(&caller.who(), Action::Read, &reference.name);
            if let Caller::Task { pinned, .. } = &caller {
                let versions: Vec<String> = pinned
                    .iter()
                    .filter(|(n, _)| *n == reference.name)
                    .map(|(n, v)| format!("{n}:{v}"))
                    .collect();
                if !versions.is_empty() {
                    reason = format!(
                        "{}; of this parameter its release pinned {} only",
                        reason,
                        versions.join(", ")
                    );
                }
            }
            return Err(a.deny("param.read", &reference.to_string(), reason).await);
        };
    let view = a.params.get(&reference, reveal).await?;
    // Every read of a SecureString is on the record, decrypted or not.
    if view.kind == ParamType::SecureString.as_str() {
        let detail = (reveal == Reveal::Decrypted).then(|| "decrypted".to_string());
        a.audit(
            "param.read",
            &format!("{}:{}", view.name, view.version),
            Outcome::Ok,
            detail,
        )
        .await?;
    }
    let size = 512 + view.value.as_ref().map_or(0, |v| v.len() + v.len() / 8);
    Ok(SizedJson(view, size))
}

pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Query(q): Query<ParamListQuery>,
) -> ApiResult<Json<ParamPage>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    names::check_path(&q.path).map_err(|e| bad_request(e.0))?;
    let policy = caller.policy();
    if !policy.may_list(&q.path) {
        let reason = format!(
            "{} may not list {}: no permission of it covers that path (it has {})",
            caller.who(),
            q.path,
            policy.describe()
        );
        return Err(a.deny("param.list", &q.path, reason).await);
    }
    let decrypt = q.decrypt;
    let page = a
        .params
        .list(
            &q.path,
            q.recursive,
            q.after.as_deref(),
            q.limit.unwrap_or(50),
            |name| {
                if policy.may(Action::Read, name) {
                    Some(if decrypt {
                        Reveal::Decrypted
                    } else {
                        Reveal::Plain
                    })
                } else if policy.may_read_state() {
                    Some(Reveal::Nothing)
                } else {
                    None
                }
            },
        )
        .await?;
    // One record per SecureString shown in plain text; written together (one fsync).
    let reads = page
        .parameters
        .iter()
        .filter(|p| p.kind == ParamType::SecureString.as_str() && p.value.is_some())
        .map(|p| {
            let target = format!("{}:{}", p.name, p.version);
            let a = &a;
            async move {
                a.audit("param.read", &target, Outcome::Ok, Some("decrypted".into()))
                    .await
            }
        });
    for written in futures_util::future::join_all(reads).await {
        written?;
    }
    Ok(Json(page))
}

pub(crate) async fn history(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Query(q): Query<ParamNameQuery>,
) -> ApiResult<Json<Vec<ParamView>>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    names::check_name(&q.name).map_err(|e| bad_request(e.0))?;
    if !caller.policy().may_read_state() {
        a.need(Action::Read, &q.name, "param.history").await?;
    }
    Ok(Json(a.params.history(&q.name).await?))
}

pub(crate) async fn label(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Json(req): Json<LabelRequest>,
) -> ApiResult<Json<ParamView>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    names::check_name(&req.name).map_err(|e| bad_request(e.0))?;
    a.need(Action::Write, &req.name, "param.label").await?;
    a.asked("param.label", &req.name).await?;
    let result = a
        .params
        .label(&req.name, req.version, &req.add, &req.remove, &caller.who())
        .await;
    let target = made(&result, |v| format!("{}:{}", v.name, v.version), &req.name);
    Ok(Json(a.finish("param.label", &target, result).await?))
}

pub(crate) async fn delete(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Query(q): Query<ParamNameQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    names::check_name(&q.name).map_err(|e| bad_request(e.0))?;
    a.need(Action::Write, &q.name, "param.delete").await?;
    a.asked("param.delete", &q.name).await?;
    let result = a.params.delete(&q.name).await;
    a.finish("param.delete", &q.name, result).await?;
    Ok(Json(serde_json::json!({ "deleted": q.name })))
}

/// A task's identity, for the agent of the node it is assigned to.
pub(crate) async fn task_token(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Path(task): Path<String>,
    Json(req): Json<TaskTokenRequest>,
) -> ApiResult<Json<TaskToken>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    let node = match &caller {
        Caller::Node(node) if *node == req.node => node.clone(),
        Caller::Node(node) => {
            let reason = format!(
                "node {node} may not ask for the identity of a task of node {}",
                req.node
            );
            return Err(a.deny("identity.issue", &task, reason).await);
        }
        _ => {
            a.need_admin("identity.issue", &task).await?;
            req.node.clone()
        }
    };
    a.asked("identity.issue", &task).await?;
    let result = a
        .params
        .issue_task_token(
            &node,
            &task,
            dozen_control::params::identity::TASK_TOKEN_TTL_MS,
        )
        .await;
    let (token, expires_at_ms) = a.finish("identity.issue", &task, result).await?;
    Ok(Json(TaskToken {
        token,
        expires_at_ms,
    }))
}

pub(crate) async fn keys(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
) -> ApiResult<Json<Vec<KeyView>>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    if !caller.policy().may_read_state() {
        a.need_admin("key.list", "keys").await?;
    }
    Ok(Json(a.params.keys().await?))
}

pub(crate) async fn rotate(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Json(req): Json<RotateKeyRequest>,
) -> ApiResult<Json<KeyView>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    let action = if req.import.is_some() {
        "key.import"
    } else {
        "key.rotate"
    };
    a.need_admin(action, &req.name).await?;
    let imported = match req.import.as_deref() {
        Some(text) => Some(
            dozen_params::Key::parse(text)
                .map_err(|e| bad_request(format!("the imported key: {e}")))?,
        ),
        None => None,
    };
    a.asked(action, &req.name).await?;
    let result = a.params.rotate(&req.name, imported).await;
    let target = made(&result, |v| format!("{}:{}", v.name, v.version), &req.name);
    Ok(Json(a.finish(action, &target, result).await?))
}

pub(crate) async fn rewrap(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
) -> ApiResult<Json<RewrapResponse>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    a.need_admin("key.rewrap", "keys").await?;
    a.asked("key.rewrap", "keys").await?;
    let result = a.params.rewrap().await;
    let rewrapped = a.finish("key.rewrap", "keys", result).await?;
    Ok(Json(RewrapResponse { rewrapped }))
}

pub(crate) async fn list_tokens(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
) -> ApiResult<Json<Vec<TokenView>>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    if !caller.policy().may_read_state() {
        a.need_admin("token.list", "tokens").await?;
    }
    Ok(Json(tokens::list(s.store.as_ref()).await?))
}

pub(crate) async fn create_token(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Json(req): Json<CreateTokenRequest>,
) -> ApiResult<Json<CreatedToken>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    a.need_admin("token.create", &req.name).await?;
    let policy = Policy::parse(&req.policy).map_err(|e| bad_request(e.0))?;
    a.asked("token.create", &req.name).await?;
    let result = tokens::create(
        s.store.as_ref(),
        &req.name,
        policy,
        req.expires_at_ms,
        &caller.who(),
    )
    .await;
    let (token, view) = a.finish("token.create", &req.name, result).await?;
    Ok(Json(CreatedToken { token, view }))
}

pub(crate) async fn revoke_token(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    a.need_admin("token.revoke", &name).await?;
    a.asked("token.revoke", &name).await?;
    let result = tokens::revoke(s.store.as_ref(), &name).await;
    a.finish("token.revoke", &name, result).await?;
    Ok(Json(serde_json::json!({ "revoked": name })))
}

pub(crate) async fn audit(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditRecord>>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    a.need_admin("audit.read", "audit").await?;
    let filter = AuditFilter {
        since_ms: q.since_ms,
        who: q.who,
        action: q.action,
        target: q.target,
        outcome: q.outcome,
        limit: q.limit.unwrap_or(100),
    };
    let records = read_trail(&s, move |audit| audit.read(&filter)).await?;
    Ok(Json(
        records
            .into_iter()
            .map(|r| AuditRecord {
                seq: r.seq,
                server: r.server,
                at_ms: r.event.at_ms,
                who: r.event.who,
                from: r.event.from,
                action: r.event.action,
                target: r.event.target,
                outcome: r.event.outcome.as_str().into(),
                detail: r.event.detail,
                prev: r.prev,
                hash: r.hash,
            })
            .collect(),
    ))
}

pub(crate) async fn verify(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    connection: Option<Extension<ConnectionInfo>>,
) -> ApiResult<Json<Vec<AuditVerification>>> {
    let a = ask(&s, &caller, connection.as_deref())?;
    a.need_admin("audit.verify", "audit").await?;
    let verified = read_trail(&s, |audit| audit.verify()).await?;
    Ok(Json(vec![AuditVerification {
        server: s.server_id.clone(),
        records: verified.tip.records,
        first_seq: verified.first_seq,
        last_seq: verified.tip.seq,
        last_hash: verified.tip.hash,
        broken: verified.broken.map(|b| b.to_string()),
    }]))
}

/// The parameter store's routes, for the router and the OpenAPI document.
pub(crate) fn routes() -> crate::openapi::Routes {
    use crate::openapi::{json, Routes};
    use dozen_api::paths;
    Routes::new()
        .add(
            "put",
            paths::PARAM,
            json::<ParamView>("store a new version of a parameter (needs `write` on it)")
                .body::<PutParamRequest>(),
            put,
        )
        .add(
            "get",
            paths::PARAM,
            json::<ParamView>(
                "one parameter: `name`, `name:version` or `name@label` (the value needs `read`)",
            )
            .query::<ParamQuery>(),
            get,
        )
        .add(
            "delete",
            paths::PARAM,
            json::<serde_json::Value>("delete a parameter and every version of it")
                .query::<ParamNameQuery>(),
            delete,
        )
        .add(
            "get",
            paths::PARAMS,
            json::<ParamPage>("the parameters under a path, a page at a time")
                .query::<ParamListQuery>(),
            list,
        )
        .add(
            "get",
            paths::PARAM_HISTORY,
            json::<Vec<ParamView>>("every kept version of a parameter, newest first")
                .query::<ParamNameQuery>(),
            history,
        )
        .add(
            "post",
            paths::PARAM_LABELS,
            json::<ParamView>("put labels on a version, or take them off").body::<LabelRequest>(),
            label,
        )
        .add(
            "get",
            paths::KEYS,
            json::<Vec<KeyView>>("the key-encryption keys (never their secrets)"),
            keys,
        )
        .add(
            "post",
            paths::KEYS_ROTATE,
            json::<KeyView>("a new version of a key-encryption key, generated or imported")
                .body::<RotateKeyRequest>(),
            rotate,
        )
        .add(
            "post",
            paths::KEYS_REWRAP,
            json::<RewrapResponse>("seal old data keys under the newest key versions"),
            rewrap,
        )
        .add(
            "get",
            paths::TOKENS,
            json::<Vec<TokenView>>("operator tokens (never their secrets)"),
            list_tokens,
        )
        .add(
            "post",
            paths::TOKENS,
            json::<CreatedToken>("a new operator token with a policy; shown once")
                .body::<CreateTokenRequest>(),
            create_token,
        )
        .add(
            "delete",
            paths::TOKEN,
            json::<serde_json::Value>("revoke an operator token"),
            revoke_token,
        )
        .add(
            "get",
            paths::AUDIT,
            json::<Vec<AuditRecord>>("this server's audit records, newest last")
                .query::<AuditQuery>(),
            audit,
        )
        .add(
            "post",
            paths::TASK_TOKEN,
            json::<TaskToken>("a task's identity token, for the agent of its node")
                .body::<TaskTokenRequest>(),
            task_token,
        )
        .add(
            "get",
            paths::AUDIT_VERIFY,
            json::<Vec<AuditVerification>>("whether this server's audit hash chain holds"),
            verify,
        )
}
