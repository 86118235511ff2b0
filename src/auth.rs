//! Who may call what: bearer tokens stored hashed, roles that nest, and the layer that checks
//! every gRPC call before any service sees it.
//!
//! The tokens file (`auth.tokens`, `--auth-tokens FILE`) lists one entry per caller:
//!
//! ```toml
//! [[token]]
//! name = "ann"          # the identity recorded in journals and logs
//! role = "operator"     # reader | client | operator | admin
//! sha256 = "<hex SHA-256 of the secret>"
//! ```
//!
//! A client sends `authorization: Bearer <secret>`; the node hashes the secret and compares it
//! with every stored hash in constant time ([`subtle`]), so neither the secret nor which entry
//! came close leaks through timing. Roles nest ([`Role`]): each has every right of the ones
//! below it. [`required_role`] is the table of what each RPC needs; health checks are open, and
//! reflection is open when it is served (`auth.reflection`, on by default).
//!
//! Without a tokens file the node runs without authentication (the local default of
//! `sagaflow dev`): no call is refused, and interventions record the operator the caller
//! names. With one, every call but health (and reflection) needs a token: none is
//! `UNAUTHENTICATED`, one whose role is too low is `PERMISSION_DENIED` naming the role needed,
//! and the operator recorded in journals is the token's name (the services read the
//! [`Identity`] this layer puts in each request's extensions).
//!
//! The file is read again on `SIGHUP` and when it changes on disk
//! ([`crate::reload`]); a file that no longer parses is refused with a log line, and the
//! tokens loaded before stay in force.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// What a caller may do; each role has the rights of the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Gets, lists and watches orders and sagas; cluster status, analytics, dead letters
    /// (list and show).
    Reader,
    /// Also starts sagas and places orders.
    Client,
    /// Also intervenes on sagas (retry, skip, compensate, cancel, abandon) and replays or
    /// discards dead letters.
    Operator,
    /// Also changes definitions and the cluster.
    Admin,
}

impl Role {
    /// The role named `name` (`reader`, `client`, `operator`, `admin`).
    pub fn from_name(name: &str) -> Option<Role> {
        [Role::Reader, Role::Client, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == name)
    }

    /// Its name as written in the tokens file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who made a call: set by the [`AuthLayer`] in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's (or certificate's) name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (health checks, and reflection when served).
    Open,
    /// A token of at least this role.
    Role(Role),
}

/// The access each RPC needs, by its gRPC path (`/sagaflow.v1.OrderService/PlaceOrder`).
/// A Sagaflow method missing here needs `admin` (a test checks that every method of the
/// protocol is listed); anything else that is not health or reflection too.
pub fn required_role(path: &str, reflection_open: bool) -> Access {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let reader = Access::Role(Role::Reader);
    let client = Access::Role(Role::Client);
    let operator = Access::Role(Role::Operator);
    match (service, method) {
        ("grpc.health.v1.Health", _) => Access::Open,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _)
            if reflection_open =>
        {
            Access::Open
        }
        ("sagaflow.v1.OrderService", "GetOrder" | "WatchOrder" | "ListOrders") => reader,
        ("sagaflow.v1.OrderService", "PlaceOrder") => client,
        (
            "sagaflow.v1.SagaService",
            "GetSaga" | "WatchSaga" | "ListDefinitions" | "ListSagasNeedingAttention",
        ) => reader,
        ("sagaflow.v1.SagaService", "StartSaga" | "SignalSaga") => client,
        ("sagaflow.v1.SagaService", "InterveneSaga") => operator,
        ("sagaflow.v1.AnalyticsService", "GetSales") => reader,
        (
            "sagaflow.v1.DefinitionService",
            "PlanDefinitions" | "ListDefinitionVersions" | "GetDefinition",
        ) => reader,
        ("sagaflow.v1.DefinitionService", "ApplyDefinitions" | "RollbackDefinition") => {
            Access::Role(Role::Admin)
        }
        ("sagaflow.v1.AdminService", "ClusterStatus" | "ListDeadLetters" | "GetDeadLetter") => {
            reader
        }
        ("sagaflow.v1.AdminService", "ReplayDeadLetter" | "DiscardDeadLetter") => operator,
        _ => Access::Role(Role::Admin),
    }
}

/// Why the tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It could not be read.
    #[error("cannot read the tokens file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a valid tokens file.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file (with `:line:column` when known).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    sha256: String,
}

/// The loaded tokens: hash → identity.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Identity)>,
}

impl Tokens {
    /// Reads and checks a tokens file.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text).map_err(|(at, message)| TokensError::Invalid {
            path: match at {
                Some((line, col)) => PathBuf::from(format!("{}:{line}:{col}", path.display())),
                None => path.to_path_buf(),
            },
            message,
        })
    }

    /// Parses the text of a tokens file; errors carry (line, column) when known.
    fn parse(text: &str) -> Result<Tokens, (Option<(usize, usize)>, String)> {
        let file: TokensFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| sagaflow_actors::definition::line_col(text, s.start));
            (at, e.message().to_string())
        })?;
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        let mut entries = Vec::with_capacity(file.token.len());
        for (i, t) in file.token.into_iter().enumerate() {
            let which = format!("token[{i}]");
            let name = t.name.trim();
            if !valid_name(name) {
                return Err((
                    None,
                    format!("{which}.name: 1 to 100 of letters, digits, `-_.@`, got {name:?}"),
                ));
            }
            if !names.insert(name.to_string()) {
                return Err((None, format!("{which}.name: `{name}` is listed twice")));
            }
            let hash = decode_sha256(&t.sha256).ok_or_else(|| {
                (
                    None,
                    format!(
                        "{which}.sha256 (`{name}`): expected the SHA-256 of the secret as 64 hex digits"
                    ),
                )
            })?;
            if !hashes.insert(hash) {
                return Err((
                    None,
                    format!("{which}.sha256 (`{name}`): the same secret as another token"),
                ));
            }
            entries.push((
                hash,
                Identity {
                    name: name.to_string(),
                    role: t.role,
                },
            ));
        }
        Ok(Tokens { entries })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The identity whose secret is `secret`, comparing against every entry in constant time.
    pub fn identify(&self, secret: &str) -> Option<Identity> {
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for (stored, identity) in &self.entries {
            if bool::from(stored.ct_eq(&hash)) {
                found = Some(identity.clone());
            }
        }
        found
    }
}

/// Whether `name` may name a token: 1 to 100 of letters, digits and `-_.@`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

/// The hex SHA-256 of `secret`, as the tokens file stores it.
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The node's authenticator: its tokens (reloadable), the roles of client certificates, and
/// whether reflection is open.
#[derive(Debug)]
pub struct Auth {
    tokens: RwLock<Arc<Tokens>>,
    path: Option<PathBuf>,
    certificates: Vec<(String, Identity)>,
    reflection_open: bool,
}

impl Auth {
    /// Loads the tokens file at `path`.
    pub fn load(path: &Path, reflection_open: bool) -> Result<Auth, TokensError> {
        Auth::new(Some(path), &[], reflection_open)
    }

    /// An authenticator from a tokens file (if any) and certificate roles: `(common name,
    /// identity)` of mutual-TLS clients, for calls that carry no token.
    pub fn new(
        path: Option<&Path>,
        certificates: &[(String, Identity)],
        reflection_open: bool,
    ) -> Result<Auth, TokensError> {
        let tokens = match path {
            Some(p) => Tokens::load(p)?,
            None => Tokens::default(),
        };
        Ok(Auth {
            tokens: RwLock::new(Arc::new(tokens)),
            path: path.map(Path::to_path_buf),
            certificates: certificates.to_vec(),
            reflection_open,
        })
    }

    /// The tokens file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the tokens file again; on error the tokens in force stay.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let tokens = Tokens::load(path)?;
        let n = tokens.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(n)
    }

    fn tokens(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks a call to `path` with `headers` (and the common name of the client certificate,
    /// under mutual TLS): `Ok(None)` for an open RPC, `Ok(Some(identity))` for an allowed one,
    /// else the status to answer with. A token wins over a certificate.
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        common_name: Option<&str>,
    ) -> Result<Option<Identity>, Status> {
        let Access::Role(needed) = required_role(path, self.reflection_open) else {
            return Ok(None);
        };
        let identity = match headers.get(http::header::AUTHORIZATION) {
            Some(value) => self.by_token(value)?,
            None => self.by_certificate(common_name).ok_or_else(|| {
                Status::unauthenticated(
                    "this node requires a token: send `authorization: Bearer <secret>` \
                     (the CLI reads SAGAFLOW_TOKEN or --token-file)",
                )
            })?,
        };
        if identity.role < needed {
            return Err(Status::permission_denied(format!(
                "`{}` has role {}; {} needs role {needed}",
                identity.name,
                identity.role,
                path.trim_start_matches('/')
            )));
        }
        Ok(Some(identity))
    }

    fn by_token(&self, value: &http::HeaderValue) -> Result<Identity, Status> {
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <secret>`")
            })?;
        self.tokens()
            .identify(secret)
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// The identity a client certificate's common name gives, if it is mapped.
    fn by_certificate(&self, common_name: Option<&str>) -> Option<Identity> {
        let cn = common_name?;
        self.certificates
            .iter()
            .find(|(mapped, _)| mapped == cn)
            .map(|(_, identity)| identity.clone())
    }
}

/// The subject common name of the client certificate of a mutual-TLS connection.
fn client_common_name<B>(req: &http::Request<B>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The tower layer that checks every call with an [`Auth`] before the services see it, and
/// hands the caller's [`Identity`] to them in the request's extensions. Without an `Auth` (no
/// tokens file) it lets every call through.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Option<Arc<Auth>>,
}

impl AuthLayer {
    /// A layer over `auth` (`None`: no authentication).
    pub fn new(auth: Option<Arc<Auth>>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Auth>>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    // No allocation per call: the inner call's future, or the refusal, ready at once.
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(auth) = &self.auth else {
            return Either::Left(self.inner.call(req));
        };
        // The certificate is read only when no token is sent (a token wins).
        let common_name = if req.headers().contains_key(http::header::AUTHORIZATION) {
            None
        } else {
            client_common_name(&req)
        };
        match auth.check(req.uri().path(), req.headers(), common_name.as_deref()) {
            Ok(identity) => {
                if let Some(identity) = identity {
                    req.extensions_mut().insert(identity);
                }
                Either::Left(self.inner.call(req))
            }
            Err(status) => {
                tracing::info!(path = %req.uri().path(), code = ?status.code(), reason = %status.message(), "call refused");
                Either::Right(futures::future::ready(Ok(status.into_http::<RB>())))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, &str)]) -> String {
        entries
            .iter()
            .map(|(name, role, secret)| {
                format!(
                    "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
                    sha256_hex(secret)
                )
            })
            .collect()
    }

    #[test]
    fn roles_nest_in_order() {
        assert!(Role::Reader < Role::Client);
        assert!(Role::Client < Role::Operator);
        assert!(Role::Operator < Role::Admin);
    }

    #[test]
    fn a_secret_identifies_its_token_and_nothing_else_does() {
        let t = Tokens::parse(&file(&[
            ("ann", "operator", "s3cret-ann"),
            ("bob", "reader", "s3cret-bob"),
        ]))
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.identify("s3cret-ann"),
            Some(Identity {
                name: "ann".into(),
                role: Role::Operator
            })
        );
        assert_eq!(t.identify("s3cret-bob").unwrap().role, Role::Reader);
        assert_eq!(t.identify("s3cret-an"), None);
        assert_eq!(t.identify(""), None);
        // The known SHA-256 of "abc".
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bad_tokens_files_are_refused_naming_the_entry() {
        let cases = [
            (
                "[[token]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"00\"\n",
                "root",
            ),
            (
                "[[token]]\nname = \"a\"\nrole = \"reader\"\nsha256 = \"zz\"\n",
                "token[0].sha256",
            ),
            (
                "[[token]]\nname = \"a b\"\nrole = \"reader\"\nsha256 = \"00\"\n",
                "token[0].name",
            ),
            (
                "[[token]]\nname = \"a\"\nrole = \"reader\"\nsecret = \"x\"\n",
                "secret",
            ),
        ];
        for (text, expect) in cases {
            let (_, message) = Tokens::parse(text).unwrap_err();
            assert!(message.contains(expect), "{text}: {message}");
        }
        let twice = file(&[("ann", "reader", "x"), ("ann", "admin", "y")]);
        assert!(Tokens::parse(&twice)
            .unwrap_err()
            .1
            .contains("listed twice"));
        let same = file(&[("ann", "reader", "x"), ("bob", "admin", "x")]);
        assert!(Tokens::parse(&same).unwrap_err().1.contains("same secret"));
        // A syntax error names its line.
        let (at, _) = Tokens::parse("[[token]]\nname = \n").unwrap_err();
        assert_eq!(at.map(|(line, _)| line), Some(2));
    }

    #[test]
    fn calls_are_checked_against_the_role_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            file(&[("rita", "reader", "r"), ("otto", "operator", "o")]),
        )
        .unwrap();
        let auth = Auth::load(&path, true).unwrap();
        let headers = |secret: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(s) = secret {
                h.insert(
                    http::header::AUTHORIZATION,
                    format!("Bearer {s}").parse().unwrap(),
                );
            }
            h
        };
        let place = "/sagaflow.v1.OrderService/PlaceOrder";
        let get = "/sagaflow.v1.OrderService/GetOrder";
        let code = |r: Result<Option<Identity>, Status>| r.map_err(|s| s.code());
        assert_eq!(
            code(auth.check(get, &headers(None), None)),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(auth.check(get, &headers(Some("nope")), None)),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            auth.check(get, &headers(Some("r")), None)
                .unwrap()
                .unwrap()
                .name,
            "rita"
        );
        let denied = auth.check(place, &headers(Some("r")), None).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("needs role client"), "{denied:?}");
        assert!(auth.check(place, &headers(Some("o")), None).is_ok());
        // Health is open; reflection as configured.
        assert_eq!(
            code(auth.check("/grpc.health.v1.Health/Check", &headers(None), None)),
            Ok(None)
        );
        assert_eq!(
            code(auth.check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &headers(None),
                None
            )),
            Ok(None)
        );
        let closed = Auth::load(&path, false).unwrap();
        assert!(closed
            .check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &headers(Some("o")),
                None
            )
            .is_err());

        // Rotation: a new file replaces the tokens; a broken one leaves them in force.
        std::fs::write(&path, file(&[("rita", "admin", "r2")])).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert!(auth.check(get, &headers(Some("r")), None).is_err());
        assert!(auth.check(place, &headers(Some("r2")), None).is_ok());
        std::fs::write(&path, "[[token]\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.check(place, &headers(Some("r2")), None).is_ok());
    }

    #[test]
    fn every_method_of_the_protocol_has_a_role() {
        use prost::Message as _;
        let set =
            prost_types::FileDescriptorSet::decode(sagaflow_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    methods += 1;
                    // Admin is also the fallback for unlisted methods: only these are listed
                    // with it, every other method must have a lower role.
                    let admin = [
                        "/sagaflow.v1.DefinitionService/ApplyDefinitions",
                        "/sagaflow.v1.DefinitionService/RollbackDefinition",
                    ];
                    if admin.contains(&path.as_str()) {
                        assert_eq!(required_role(&path, true), Access::Role(Role::Admin));
                    } else {
                        assert_ne!(
                            required_role(&path, true),
                            Access::Role(Role::Admin),
                            "{path} is not in the role table"
                        );
                    }
                }
            }
        }
        assert!(methods >= 16, "{methods}");
    }
}
