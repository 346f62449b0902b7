//! The parameter store's wire types: parameters, key-encryption keys, operator tokens and
//! the audit trail.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use dozen_model::params::{KeyView, ParamPage, ParamView, TokenView};

/// `PUT /v1/param`: a new version.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutParamRequest {
    pub name: String,
    /// `String`, `StringList` or `SecureString`; absent: the parameter's current type
    /// (`String` for a new one), so a new version never drops encryption by omission.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub value: String,
    /// Replaces the description when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Replace the tags when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// When it expires (wall time, milliseconds); each put states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// How long before the expiry a warning event is recorded (default a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_before_ms: Option<u64>,
    /// The key-encryption key to seal a SecureString under (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `GET /v1/param?name=/a/b` (or `/a/b:3`, `/a/b@prod`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct ParamQuery {
    pub name: String,
    /// Decrypt a SecureString (needs `read` on it; the read is audited).
    #[serde(default)]
    pub decrypt: bool,
}

/// `DELETE /v1/param?name=`, `GET /v1/param/history?name=`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct ParamNameQuery {
    pub name: String,
}

/// `GET /v1/params?path=/shop/&recursive=true`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct ParamListQuery {
    #[serde(default = "root_path")]
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    /// Show values (those the caller may read), SecureStrings decrypted.
    #[serde(default)]
    pub decrypt: bool,
    /// The `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many (1 to 100, default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

fn root_path() -> String {
    "/".into()
}

/// `POST /v1/param/labels`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    pub name: String,
    /// The version to label (default the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `POST /v1/keys/rotate`: a new version of a key-encryption key, generated or imported.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyRequest {
    pub name: String,
    /// Bring your own key: 32 bytes as 64 hex digits or base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RewrapResponse {
    /// Versions whose data key is now sealed under the newest key version.
    pub rewrapped: usize,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub name: String,
    /// `admin`, `read-only`, `read:/path/*`, `write:/path/*`.
    pub policy: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// The token itself: shown this once, kept nowhere in plain text.
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

/// `GET /v1/audit`: which records (the newest `limit`, oldest first).
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct AuditQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// A prefix of the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `ok`, `denied` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// One audit record as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: u64,
    pub server: String,
    pub at_ms: u64,
    pub who: String,
    pub from: String,
    pub action: String,
    pub target: String,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub prev: String,
    pub hash: String,
}

/// `GET /v1/audit/verify`: whether this server's chain holds.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditVerification {
    pub server: String,
    pub records: u64,
    /// The first record kept (above 1 when old segments were removed by retention).
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// Where and how the chain breaks; absent when it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

/// `POST /v1/tasks/{task}/token`: the identity of a task, for its node's agent.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskTokenRequest {
    /// The node the task is assigned to (a node certificate may ask for its own only).
    pub node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskToken {
    pub token: String,
    pub expires_at_ms: u64,
}

use crate::client::{ApiError, Client};
use crate::paths::{self, fill};
use reqwest::Method;

const NO_QUERY: &[(&str, &str); 0] = &[];

impl Client {
    pub async fn put_param(&self, req: &PutParamRequest) -> Result<ParamView, ApiError> {
        self.request(Method::PUT, paths::PARAM, NO_QUERY, Some(req))
            .await
    }

    pub async fn get_param(&self, query: &ParamQuery) -> Result<ParamView, ApiError> {
        self.request::<_, _, ()>(Method::GET, paths::PARAM, query, None)
            .await
    }

    pub async fn delete_param(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        let query = ParamNameQuery { name: name.into() };
        self.request::<_, _, ()>(Method::DELETE, paths::PARAM, &query, None)
            .await
    }

    pub async fn list_params(&self, query: &ParamListQuery) -> Result<ParamPage, ApiError> {
        self.request::<_, _, ()>(Method::GET, paths::PARAMS, query, None)
            .await
    }

    pub async fn param_history(&self, name: &str) -> Result<Vec<ParamView>, ApiError> {
        let query = ParamNameQuery { name: name.into() };
        self.request::<_, _, ()>(Method::GET, paths::PARAM_HISTORY, &query, None)
            .await
    }

    pub async fn label_param(&self, req: &LabelRequest) -> Result<ParamView, ApiError> {
        self.request(Method::POST, paths::PARAM_LABELS, NO_QUERY, Some(req))
            .await
    }

    pub async fn keys(&self) -> Result<Vec<KeyView>, ApiError> {
        self.request::<_, _, ()>(Method::GET, paths::KEYS, NO_QUERY, None)
            .await
    }

    pub async fn rotate_key(&self, req: &RotateKeyRequest) -> Result<KeyView, ApiError> {
        self.request(Method::POST, paths::KEYS_ROTATE, NO_QUERY, Some(req))
            .await
    }

    pub async fn rewrap_keys(&self) -> Result<RewrapResponse, ApiError> {
        self.request::<_, _, ()>(Method::POST, paths::KEYS_REWRAP, NO_QUERY, None)
            .await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenView>, ApiError> {
        self.request::<_, _, ()>(Method::GET, paths::TOKENS, NO_QUERY, None)
            .await
    }

    pub async fn create_token(&self, req: &CreateTokenRequest) -> Result<CreatedToken, ApiError> {
        self.request(Method::POST, paths::TOKENS, NO_QUERY, Some(req))
            .await
    }

    pub async fn revoke_token(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        let path = fill(paths::TOKEN, &[name]);
        self.request::<_, _, ()>(Method::DELETE, &path, NO_QUERY, None)
            .await
    }

    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, ApiError> {
        self.request::<_, _, ()>(Method::GET, paths::AUDIT, query, None)
            .await
    }

    pub async fn task_token(&self, task: &str, node: &str) -> Result<TaskToken, ApiError> {
        let path = fill(paths::TASK_TOKEN, &[task]);
        let req = TaskTokenRequest { node: node.into() };
        self.request(Method::POST, &path, NO_QUERY, Some(&req))
            .await
    }

    pub async fn verify_audit(&self) -> Result<Vec<AuditVerification>, ApiError> {
        self.request::<_, _, ()>(Method::GET, paths::AUDIT_VERIFY, NO_QUERY, None)
            .await
    }
}
