//! The OpenAPI 3 document, generated as the router is built: every route is added through
//! [`Routes`], which puts the handler in the router and its operation (path and query
//! parameters, body and answer schemas from the wire types' `ToSchema`) in the document, so
//! the two cannot drift apart. Served at `/v1/openapi.json`; `dozen api openapi` prints it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::{on, MethodFilter};
use axum::Router;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder, PathsBuilder, RefOr,
    Required, Schema, Type,
};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::AppState;

const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const SECURITY: &str = "token";

/// One operation's documentation.
pub(crate) struct Doc {
    summary: &'static str,
    public: bool,
    parameters: Vec<utoipa::openapi::path::Parameter>,
    body: Option<(&'static str, RefOr<Schema>)>,
    answer: (&'static str, &'static str, Option<RefOr<Schema>>),
    schemas: Vec<(String, RefOr<Schema>)>,
}

/// An operation that answers JSON `T`.
pub(crate) fn json<T: ToSchema>(summary: &'static str) -> Doc {
    let mut doc = Doc::new(summary);
    doc.answer = ("200", JSON, Some(doc.schema_of::<T>()));
    doc
}

/// An operation that answers a [`dozen_api::ListResponse`] of `T` (the list half of
/// list-then-watch).
pub(crate) fn list<T: ToSchema>(summary: &'static str) -> Doc {
    let mut doc = json::<dozen_api::ListResponse<T>>(summary);
    // A generic's schema refers to its argument by name: document the argument too.
    doc.schema_of::<T>();
    doc.schemas.push((T::name().into_owned(), T::schema()));
    doc
}

/// An operation that streams newline-delimited JSON `T`s.
pub(crate) fn ndjson<T: ToSchema>(summary: &'static str) -> Doc {
    let mut doc = Doc::new(summary);
    doc.answer = ("200", NDJSON, Some(doc.schema_of::<T>()));
    doc
}

/// An operation that answers 204 No Content.
pub(crate) fn no_content(summary: &'static str) -> Doc {
    let mut doc = Doc::new(summary);
    doc.answer = ("204", "", None);
    doc
}

/// An operation that answers `content_type` bytes with `status`.
pub(crate) fn bytes(
    summary: &'static str,
    status: &'static str,
    content_type: &'static str,
) -> Doc {
    let mut doc = Doc::new(summary);
    doc.answer = (status, content_type, Some(binary()));
    doc
}

/// The schema of raw bytes.
fn binary() -> RefOr<Schema> {
    let schema = ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Binary,
        )))
        .build();
    RefOr::T(Schema::Object(schema))
}

impl Doc {
    fn new(summary: &'static str) -> Doc {
        Doc {
            summary,
            public: false,
            parameters: Vec::new(),
            body: None,
            answer: ("200", JSON, None),
            schemas: Vec::new(),
        }
    }

    fn schema_of<T: ToSchema>(&mut self) -> RefOr<Schema> {
        T::schemas(&mut self.schemas);
        T::schema()
    }

    /// A JSON request body of type `T`.
    pub(crate) fn body<T: ToSchema>(mut self) -> Doc {
        let schema = self.schema_of::<T>();
        self.body = Some((JSON, schema));
        self
    }

    /// A request body of raw bytes.
    pub(crate) fn bytes_body(mut self) -> Doc {
        self.body = Some(("application/octet-stream", binary()));
        self
    }

    /// Query parameters from `Q`'s fields.
    pub(crate) fn query<Q: IntoParams>(mut self) -> Doc {
        self.parameters
            .extend(Q::into_params(|| Some(ParameterIn::Query)));
        self
    }

    /// Needs no credential.
    pub(crate) fn public(mut self) -> Doc {
        self.public = true;
        self
    }

    fn operation(self, path: &str, method: &str) -> Operation {
        let mut op = OperationBuilder::new()
            .summary(Some(self.summary))
            .operation_id(Some(format!(
                "{method}{}",
                path.replace(['/', '{', '}', '-', '.'], "_")
            )));
        // `{name}` segments are path parameters.
        for segment in path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
                );
            }
        }
        for p in self.parameters {
            op = op.parameter(p);
        }
        if let Some((content_type, schema)) = self.body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(
                        content_type,
                        ContentBuilder::new().schema(Some(schema)).build(),
                    )
                    .build(),
            ));
        }
        let (status, content_type, schema) = self.answer;
        let mut answer = ResponseBuilder::new().description(self.summary);
        if let Some(schema) = schema {
            answer = answer.content(
                content_type,
                ContentBuilder::new().schema(Some(schema)).build(),
            );
        }
        op = op.response(status, answer.build());
        op = op.response(
            "default",
            ResponseBuilder::new()
                .description("the error, with a hint where there is one")
                .content(
                    JSON,
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .build(),
                )
                .build(),
        );
        if !self.public {
            op = op.security(SecurityRequirement::new(SECURITY, Vec::<String>::new()));
        }
        op.build()
    }
}

/// The router and its document, built together.
pub(crate) struct Routes {
    router: Router<Arc<AppState>>,
    paths: BTreeMap<&'static str, PathItem>,
    schemas: BTreeMap<String, RefOr<Schema>>,
    served: Vec<(&'static str, &'static str)>,
}

impl Routes {
    pub(crate) fn new() -> Routes {
        // Every operation's default answer refers to it.
        let schemas = BTreeMap::from([("ErrorBody".to_string(), dozen_api::ErrorBody::schema())]);
        Routes {
            router: Router::new(),
            paths: BTreeMap::new(),
            schemas,
            served: Vec::new(),
        }
    }

    /// Serves `handler` for `method` (`get`, `head`, `post`, `put`, `delete`) at `path`, and
    /// documents it.
    pub(crate) fn add<H, T>(
        mut self,
        method: &'static str,
        path: &'static str,
        doc: Doc,
        handler: H,
    ) -> Routes
    where
        H: Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let (filter, http) = match method {
            "get" => (MethodFilter::GET, HttpMethod::Get),
            "head" => (MethodFilter::HEAD, HttpMethod::Head),
            "post" => (MethodFilter::POST, HttpMethod::Post),
            "put" => (MethodFilter::PUT, HttpMethod::Put),
            "delete" => (MethodFilter::DELETE, HttpMethod::Delete),
            other => panic!("{other}: not a method the API serves"),
        };
        self.schemas.extend(doc.schemas.iter().cloned());
        let operation = doc.operation(path, method);
        match self.paths.get_mut(path) {
            Some(item) => item.merge_operations(PathItem::new(http, operation)),
            None => {
                self.paths.insert(path, PathItem::new(http, operation));
            }
        }
        self.router = self.router.route(path, on(filter, handler));
        self.served.push((method, path));
        self
    }

    /// Applies `layer` to every route added so far (authentication).
    pub(crate) fn layer_so_far(
        mut self,
        wrap: impl FnOnce(Router<Arc<AppState>>) -> Router<Arc<AppState>>,
    ) -> Routes {
        self.router = wrap(self.router);
        self
    }

    /// `(method, path)` of every route, in the order added.
    pub(crate) fn served(&self) -> &[(&'static str, &'static str)] {
        &self.served
    }

    pub(crate) fn document(&self) -> OpenApi {
        let mut paths = PathsBuilder::new();
        for (path, item) in &self.paths {
            paths = paths.path(*path, item.clone());
        }
        let components = ComponentsBuilder::new()
            .schemas_from_iter(self.schemas.clone())
            .security_scheme(
                SECURITY,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            )
            .build();
        OpenApiBuilder::new()
            .info(
                InfoBuilder::new()
                    .title("dozen")
                    .version(env!("CARGO_PKG_VERSION"))
                    .description(Some(
                        "The dozen control plane: stacks, services, tasks, nodes, logs, routes. \
                         Operators send `Authorization: Bearer <token>`; nodes present their \
                         certificate over TLS.",
                    ))
                    .build(),
            )
            .paths(paths.build())
            .components(Some(components))
            .build()
    }

    pub(crate) fn merge(mut self, other: Routes) -> Routes {
        self.router = self.router.merge(other.router);
        for (path, item) in other.paths {
            match self.paths.get_mut(path) {
                Some(mine) => mine.merge_operations(item),
                None => {
                    self.paths.insert(path, item);
                }
            }
        }
        self.schemas.extend(other.schemas);
        self.served.extend(other.served);
        self
    }

    pub(crate) fn into_router(self) -> Router<Arc<AppState>> {
        self.router
    }
}
