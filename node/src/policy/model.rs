//! Policy documents: SMI `TrafficTarget` (`access.smi-spec.io/v1alpha3`), `HTTPRouteGroup`
//! and `TCPRoute` (`specs.smi-spec.io/v1alpha4`), `TrafficSplit` (`split.smi-spec.io/v1alpha4`)
//! and Weft's `Mesh` settings and `HTTPRoutePolicy` retries and timeouts (`weft.io/v1alpha1`),
//! read from multi-document YAML files into typed values and validated as one set.
//!
//! This module owns the document shapes and every validation rule; what it returns is final,
//! so nothing downstream re-parses strings or re-checks references. It must never return a
//! partial set: either the whole set is valid, or every error found is returned, each on one
//! line naming file, line, document, object and field.
//!
//! Shapes accepted (for all kinds):
//! - the Kubernetes shape: `apiVersion`, `kind`, `metadata: {name, namespace}`, `spec: {...}`;
//! - the older, flattened SMI shape: the body's fields at the top level instead of under
//!   `spec` (HTTPRouteGroup v1alpha1/2, TrafficTarget v1alpha1), and `name`/`namespace` at
//!   the top level instead of under `metadata`;
//! - a missing `apiVersion` (most SMI examples omit it) is read as the kind's frozen version,
//!   with a warning; older versions of the same API group are read as the frozen version,
//!   with a warning: TrafficTarget v1alpha1's `specs` is `rules`, and v1alpha1/2's
//!   `destination.port` restricts the port; TrafficSplit v1alpha1's quantity weights
//!   (`500m`) become milli-units.
//!
//! The `Mesh` document (at most one per set):
//! ```yaml
//! apiVersion: weft.io/v1alpha1
//! kind: Mesh
//! metadata: {name: mesh}
//! spec:
//!   default: deny          # allow | deny (default allow): destinations no TrafficTarget names
//!   pathRegexMatch: prefix # prefix | full (default prefix): how pathRegex is anchored
//! ```
//!
//! The `HTTPRoutePolicy` document (at most one per destination service), applied by the
//! calling agent to HTTP requests addressed to the service; `timeouts` and `retry` have the
//! shape of Gateway API HTTPRoute's fields (GEP-1742, GEP-1731), durations GEP-2257's format
//! (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`, see [`parse_duration`]):
//! ```yaml
//! apiVersion: weft.io/v1alpha1
//! kind: HTTPRoutePolicy
//! metadata: {name: api, namespace: default}
//! spec:
//!   service: api                # required: the destination service, in this namespace
//!   timeouts:
//!     request: 10s              # whole transaction, retries included; absent or 0s: none
//!     backendRequest: 2s        # each attempt; absent or 0s: none; at most request
//!   retry:                      # absent: no retries
//!     attempts: 2               # retries after the first try, 1-10 (default 1)
//!     codes: [502, 503, 504]    # 400-599 (this default); [] retries connect errors only
//!     backoff: 25ms             # minimum wait between attempts (default 25ms)
//!     nonIdempotent: false      # weft extension: also retry POST, PATCH, ... (default false)
//!   retryBudget:                # weft extension: retries add at most this load
//!     percent: 20               # 0-100 (default 20)
//!     minRetriesPerSecond: 10   # always allowed, whatever the percentage (default 10)
//! ```
//!
//! Resolutions of SMI's ambiguities (`research/specs.md` §1.3.3, §1.8): `pathRegex` is anchored
//! at the start (the spec text) unless the Mesh says `full`; header values match in full;
//! headers are accepted as a map or as a list of single-key maps; a rule naming a match its
//! group lacks is an error; `destination.namespace` must be the TrafficTarget's own namespace
//! and sources default to it; weights are whole numbers; UDPRoute is refused because Weft
//! carries TCP and HTTP only; an extension source `kind: SPIFFEID` names a raw SPIFFE ID.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use hyper::header::HeaderName;
use weft_ca::SpiffeId;
use weft_discovery::ServiceKey;

use super::matcher::{self, Anchor};
use super::yaml::{self, Node, Value};

/// Namespace of documents that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Largest TrafficSplit weight (Gateway API's bound, so sums never overflow).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Largest HTTPRoutePolicy `retry.attempts` (retries after the first try).
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// `retry.attempts` when a `retry` omits it.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;

/// `retry.codes` when a `retry` omits them: the gateway errors that mean "try another
/// endpoint" (GEP-1731 requires supporting 500 too; it is not a default because a 500 is
/// usually the application's own answer).
pub const DEFAULT_RETRY_CODES: [u16; 3] = [502, 503, 504];

/// `retry.backoff` when a `retry` omits it.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// `retryBudget.percent` when omitted.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;

/// `retryBudget.minRetriesPerSecond` when omitted.
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;

/// The kinds a policy set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `access.smi-spec.io` TrafficTarget.
    TrafficTarget,
    /// `specs.smi-spec.io` HTTPRouteGroup.
    HttpRouteGroup,
    /// `specs.smi-spec.io` TCPRoute.
    TcpRoute,
    /// `split.smi-spec.io` TrafficSplit.
    TrafficSplit,
    /// `weft.io` Mesh settings.
    Mesh,
    /// `weft.io` HTTPRoutePolicy: retries and timeouts for one destination service.
    HttpRoutePolicy,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::TrafficTarget,
        Kind::HttpRouteGroup,
        Kind::TcpRoute,
        Kind::TrafficSplit,
        Kind::Mesh,
        Kind::HttpRoutePolicy,
    ];

    /// The kind as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TrafficTarget => "TrafficTarget",
            Kind::HttpRouteGroup => "HTTPRouteGroup",
            Kind::TcpRoute => "TCPRoute",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::Mesh => "Mesh",
            Kind::HttpRoutePolicy => "HTTPRoutePolicy",
        }
    }

    /// The frozen `apiVersion` Weft implements for this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::TrafficTarget => "access.smi-spec.io/v1alpha3",
            Kind::HttpRouteGroup | Kind::TcpRoute => "specs.smi-spec.io/v1alpha4",
            Kind::TrafficSplit => "split.smi-spec.io/v1alpha4",
            Kind::Mesh | Kind::HttpRoutePolicy => "weft.io/v1alpha1",
        }
    }

    /// Versions of the kind's group that are read (as the frozen version): `v1alphaN`, N ≤ this.
    fn newest_alpha(self) -> u8 {
        match self {
            Kind::TrafficTarget => 3,
            Kind::HttpRouteGroup | Kind::TcpRoute | Kind::TrafficSplit => 4,
            Kind::Mesh | Kind::HttpRoutePolicy => 1,
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Fields of the body (under `spec`, or at the top level in the flattened shape).
    fn body_fields(self, version: u8) -> &'static [&'static str] {
        match self {
            Kind::TrafficTarget if version == 1 => &["destination", "specs", "sources"],
            Kind::TrafficTarget => &["destination", "rules", "sources"],
            Kind::HttpRouteGroup | Kind::TcpRoute => &["matches"],
            Kind::TrafficSplit => &["service", "backends", "matches"],
            Kind::Mesh => &["default", "pathRegexMatch"],
            Kind::HttpRoutePolicy => &["service", "timeouts", "retry", "retryBudget"],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a document was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file name as given to [`PolicySet::parse_files`].
    pub file: String,
    /// 1-based document index in the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (document {})",
            self.file, self.line, self.document
        )
    }
}

/// A namespaced document's name, namespace and origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    /// Where the document was read from.
    pub origin: Origin,
}

/// One error (or warning) in a policy set, rendered on one line:
/// `FILE:LINE: document N (KIND NS/NAME): FIELD: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file name as given.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based document index, when the error is inside a document.
    pub document: Option<usize>,
    /// `KIND NS/NAME` (or just `KIND`) once the document's header was read.
    pub object: Option<String>,
    /// Field path such as `spec.rules[0].matches[1]`; empty for document-level errors.
    pub field: String,
    /// What is wrong, one line.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(document) = self.document {
            write!(f, "document {document}")?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
            f.write_str(": ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Who a TrafficTarget grants access to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// `kind: ServiceAccount`: the service `NS/NAME`, whose SPIFFE ID is
    /// `spiffe://TD/ns/NS/sa/NAME` in the mesh's trust domain.
    ServiceAccount(ServiceKey),
    /// `kind: SPIFFEID` (Weft extension): exactly this SPIFFE ID, of any trust domain.
    SpiffeId(SpiffeId),
}

/// The route kinds a TrafficTarget rule may reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// An HTTPRouteGroup: restricts requests.
    HttpRouteGroup,
    /// A TCPRoute: restricts ports.
    TcpRoute,
}

impl RouteKind {
    fn kind(self) -> Kind {
        match self {
            RouteKind::HttpRouteGroup => Kind::HttpRouteGroup,
            RouteKind::TcpRoute => Kind::TcpRoute,
        }
    }
}

/// One `spec.rules[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTargetRule {
    /// The referenced route's kind.
    pub kind: RouteKind,
    /// The referenced route's name, in the TrafficTarget's namespace.
    pub name: String,
    /// Names of the HTTPRouteGroup matches this rule selects; empty selects all of them.
    pub matches: Vec<String>,
}

/// `access.smi-spec.io` TrafficTarget: which sources may reach a destination, on which routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTarget {
    /// Name, namespace, origin.
    pub meta: ObjectMeta,
    /// The destination service (ServiceAccount name = service name, same namespace).
    pub destination: ServiceKey,
    /// v1alpha1/2 `destination.port`: only this port (ANDed with the rules).
    pub destination_port: Option<u16>,
    /// At least one rule; a request must satisfy the rules as §1.3.3 of the research says.
    pub rules: Vec<TrafficTargetRule>,
    /// At least one source.
    pub sources: Vec<Subject>,
}

/// The HTTP methods SMI names; `Any` is `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HttpMethod {
    /// `*`: every method.
    Any = 0,
    /// `GET`.
    Get = 1,
    /// `HEAD`.
    Head = 2,
    /// `PUT`.
    Put = 3,
    /// `POST`.
    Post = 4,
    /// `DELETE`.
    Delete = 5,
    /// `CONNECT`.
    Connect = 6,
    /// `OPTIONS`.
    Options = 7,
    /// `TRACE`.
    Trace = 8,
    /// `PATCH`.
    Patch = 9,
}

impl HttpMethod {
    const ALL: [HttpMethod; 10] = [
        HttpMethod::Any,
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Put,
        HttpMethod::Post,
        HttpMethod::Delete,
        HttpMethod::Connect,
        HttpMethod::Options,
        HttpMethod::Trace,
        HttpMethod::Patch,
    ];

    /// The method as written (case-sensitive, RFC 9110).
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Any => "*",
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Put => "PUT",
            HttpMethod::Post => "POST",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }

    /// Parses an exact method name or `*`.
    pub fn parse(text: &str) -> Option<HttpMethod> {
        HttpMethod::ALL.into_iter().find(|m| m.as_str() == text)
    }
}

/// One HTTPRouteGroup match: every present condition must hold (absent ones match anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMatch {
    /// Unique within its group; referenced by TrafficTarget rules.
    pub name: String,
    /// Regex for the normalised request path (anchoring per the Mesh's `pathRegexMatch`).
    pub path_regex: Option<String>,
    /// Allowed methods; empty means every method.
    pub methods: Vec<HttpMethod>,
    /// Lower-case header name and a regex the value must match in full.
    pub headers: Vec<(String, String)>,
}

/// `specs.smi-spec.io` HTTPRouteGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRouteGroup {
    /// Name, namespace, origin.
    pub meta: ObjectMeta,
    /// At least one match.
    pub matches: Vec<HttpMatch>,
}

/// `specs.smi-spec.io` TCPRoute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRoute {
    /// Name, namespace, origin.
    pub meta: ObjectMeta,
    /// Allowed ports; empty means every port.
    pub ports: Vec<u16>,
}

/// One TrafficSplit backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBackend {
    /// The backend service, in the split's namespace.
    pub service: ServiceKey,
    /// Relative weight, 0 to [`MAX_WEIGHT`]; 0 sends it nothing.
    pub weight: u32,
}

/// `split.smi-spec.io` TrafficSplit: requests to a root service go to weighted backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficSplit {
    /// Name, namespace, origin.
    pub meta: ObjectMeta,
    /// The root ("apex") service clients address; it need not be registered by any host.
    pub service: ServiceKey,
    /// At least one backend.
    pub backends: Vec<SplitBackend>,
    /// HTTPRouteGroups (same namespace) whose matches select the requests that are split;
    /// empty splits every request. Unmatched requests go to the root service's own endpoints.
    pub matches: Vec<String>,
}

/// What happens to traffic for a destination that no TrafficTarget names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultPolicy {
    /// Allowed (authenticated traffic only, as always).
    #[default]
    Allow,
    /// Denied.
    Deny,
}

/// How `pathRegex` is anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathRegexMatch {
    /// `^(?:re)`: the SMI text ("anchored to the beginning of the URI").
    #[default]
    Prefix,
    /// `^(?:re)$`: the whole path, as OSM and Envoy do.
    Full,
}

/// Weft's `Mesh` settings document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// `metadata.name` (the Mesh has no namespace).
    pub name: String,
    /// Where the document was read from.
    pub origin: Origin,
    /// `spec.default`.
    pub default: DefaultPolicy,
    /// `spec.pathRegexMatch`.
    pub path_regex_match: PathRegexMatch,
}

/// `spec.timeouts` (Gateway API HTTPRoute `timeouts`, GEP-1742). `None` means no timeout:
/// the field was absent or `0s` (which Gateway API defines as "disabled"), so a present value
/// is never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// `request`: the whole client transaction, from the request's arrival to the last byte
    /// of the response, retries and backoff included; expiry answers 504.
    pub request: Option<Duration>,
    /// `backendRequest`: each attempt (first try or retry) on its own; expiry ends that
    /// attempt, which may then be retried. At most `request` when both are set.
    pub backend_request: Option<Duration>,
}

/// `spec.retry` (Gateway API HTTPRoute `retry`, GEP-1731, plus `nonIdempotent`).
///
/// A request is retried when an attempt fails to connect, is reset, times out
/// (`backendRequest`), or answers one of `codes`, as long as the request's method may be
/// retried, attempts are left, the retry budget allows it and `timeouts.request` has not
/// expired; the wait before each retry is at least `backoff`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first try, 1 to [`MAX_RETRY_ATTEMPTS`] (default
    /// [`DEFAULT_RETRY_ATTEMPTS`]): a request is sent at most `attempts + 1` times.
    pub attempts: u32,
    /// Response statuses (400-599) that are retried, in the order written, without
    /// duplicates (default [`DEFAULT_RETRY_CODES`]); empty retries only connection failures,
    /// resets and attempt timeouts.
    pub codes: Vec<u16>,
    /// Minimum wait between attempts (default [`DEFAULT_RETRY_BACKOFF`]); may be zero.
    pub backoff: Duration,
    /// `nonIdempotent` (Weft extension): also retry methods that are not idempotent (POST,
    /// PATCH, CONNECT). False (the default) retries GET, HEAD, PUT, DELETE, OPTIONS and
    /// TRACE only (RFC 9110 §9.2.2).
    pub non_idempotent: bool,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            codes: DEFAULT_RETRY_CODES.to_vec(),
            backoff: DEFAULT_RETRY_BACKOFF,
            non_idempotent: false,
        }
    }
}

/// `spec.retryBudget` (Weft extension, after Linkerd's): retries to the service may add at
/// most `percent` % to the requests sent to it, plus `min_per_second` retries every second
/// whatever the percentage. A retry the budget refuses is not sent: the failed attempt's
/// result is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// `percent`, 0 to 100 (default [`DEFAULT_RETRY_BUDGET_PERCENT`]).
    pub percent: u32,
    /// `minRetriesPerSecond` (default [`DEFAULT_RETRY_BUDGET_MIN_PER_SECOND`]).
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget {
            percent: DEFAULT_RETRY_BUDGET_PERCENT,
            min_per_second: DEFAULT_RETRY_BUDGET_MIN_PER_SECOND,
        }
    }
}

/// Weft's `HTTPRoutePolicy`: timeouts and retries for HTTP requests addressed to one service,
/// applied by the calling agent. The key is the service the client addresses (a TrafficSplit
/// root service included), not the backend a split picks; a set holds at most one per
/// service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRoutePolicy {
    /// Name, namespace, origin.
    pub meta: ObjectMeta,
    /// `spec.service`: the destination service, in the policy's namespace.
    pub service: ServiceKey,
    /// `spec.timeouts`; both `None` when absent.
    pub timeouts: Timeouts,
    /// `spec.retry`; `None` (absent) means requests are never retried.
    pub retry: Option<Retry>,
    /// `spec.retryBudget`, with its defaults when absent.
    pub budget: RetryBudget,
}

/// A validated set of policy documents.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    traffic_targets: Vec<TrafficTarget>,
    http_route_groups: Vec<HttpRouteGroup>,
    tcp_routes: Vec<TcpRoute>,
    traffic_splits: Vec<TrafficSplit>,
    mesh: Option<Mesh>,
    http_route_policies: Vec<HttpRoutePolicy>,
    /// Index into `http_route_policies` by `service`.
    route_policy_by_service: HashMap<ServiceKey, usize>,
    warnings: Vec<PolicyError>,
}

impl PolicySet {
    /// Parses and validates files given as `(name, text)`: either the whole set is valid, or
    /// every error found in it is returned (sorted by file, document and line).
    pub fn parse_files<N: AsRef<str>, T: AsRef<str>>(
        files: &[(N, T)],
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let mut builder = Builder::default();
        for (file_index, (name, text)) in files.iter().enumerate() {
            builder.add_file(file_index, name.as_ref(), text.as_ref());
        }
        builder.finish()
    }

    /// The TrafficTargets, in file and document order.
    pub fn traffic_targets(&self) -> &[TrafficTarget] {
        &self.traffic_targets
    }

    /// The HTTPRouteGroups.
    pub fn http_route_groups(&self) -> &[HttpRouteGroup] {
        &self.http_route_groups
    }

    /// The TCPRoutes.
    pub fn tcp_routes(&self) -> &[TcpRoute] {
        &self.tcp_routes
    }

    /// The TrafficSplits.
    pub fn traffic_splits(&self) -> &[TrafficSplit] {
        &self.traffic_splits
    }

    /// The HTTPRoutePolicies, in file and document order.
    pub fn http_route_policies(&self) -> &[HttpRoutePolicy] {
        &self.http_route_policies
    }

    /// The HTTPRoutePolicy for requests addressed to `service`, if any.
    pub fn route_policy(&self, service: &ServiceKey) -> Option<&HttpRoutePolicy> {
        self.route_policy_by_service
            .get(service)
            .map(|&i| &self.http_route_policies[i])
    }

    /// The Mesh settings, if the set has a Mesh document.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    /// Policy for destinations no TrafficTarget names (allow without a Mesh document).
    pub fn default_policy(&self) -> DefaultPolicy {
        self.mesh.as_ref().map(|m| m.default).unwrap_or_default()
    }

    /// How `pathRegex` is anchored (prefix without a Mesh document).
    pub fn path_regex_match(&self) -> PathRegexMatch {
        self.mesh
            .as_ref()
            .map(|m| m.path_regex_match)
            .unwrap_or_default()
    }

    /// Things that were accepted but deserve the operator's eye (a missing or older
    /// `apiVersion`, a split whose weights are all 0), in the same one-line shape as errors.
    pub fn warnings(&self) -> &[PolicyError] {
        &self.warnings
    }
}

// ---- building a set --------------------------------------------------------------------------

/// A document being read: what its errors are attributed to.
#[derive(Debug, Clone)]
struct DocRef {
    file: String,
    file_index: usize,
    document: usize,
    object: Option<String>,
}

impl DocRef {
    fn error(&self, line: usize, field: &str, message: impl Into<String>) -> (usize, PolicyError) {
        (
            self.file_index,
            PolicyError {
                file: self.file.clone(),
                line: Some(line),
                document: Some(self.document),
                object: self.object.clone(),
                field: field.to_string(),
                message: message.into(),
            },
        )
    }
}

/// Per-document reading context: collects errors and warnings.
struct Cx {
    doc: DocRef,
    errors: Vec<(usize, PolicyError)>,
    warnings: Vec<(usize, PolicyError)>,
}

impl Cx {
    fn err(&mut self, line: usize, field: &str, message: impl Into<String>) {
        let error = self.doc.error(line, field, message);
        self.errors.push(error);
    }

    fn warn(&mut self, line: usize, field: &str, message: impl Into<String>) {
        let warning = self.doc.error(line, field, message);
        self.warnings.push(warning);
    }
}

/// A reference to check once the whole set is read.
#[derive(Debug, Clone)]
struct Reference {
    doc: DocRef,
    /// Field path and line of the referenced name.
    field: String,
    line: usize,
    kind: Kind,
    namespace: String,
    name: String,
    /// HTTPRouteGroup match names the reference selects: (field, line, name).
    matches: Vec<(String, usize, String)>,
    /// Why a wrong namespace is wrong, for the hint.
    referrer: &'static str,
}

#[derive(Default)]
struct Builder {
    errors: Vec<(usize, PolicyError)>,
    warnings: Vec<(usize, PolicyError)>,
    syntax_failed: bool,
    /// Where each `(kind, namespace, name)` was first declared (documents whose header was
    /// readable, even if their body was not).
    declared: HashMap<(Kind, String, String), Origin>,
    references: Vec<Reference>,
    /// Splits without matches, by root service: the first one's label.
    unmatched_splits: HashMap<ServiceKey, String>,
    /// HTTPRoutePolicies by service: the first one's label and origin.
    route_policies: HashMap<ServiceKey, (String, Origin)>,
    set: PolicySet,
}

/// The document's header, once read.
struct Header {
    kind: Kind,
    version: u8,
    name: String,
    namespace: String,
    /// Field path and line of the name (for duplicate errors).
    name_field: String,
    name_line: usize,
}

impl Builder {
    fn add_file(&mut self, file_index: usize, file: &str, text: &str) {
        let (documents, syntax) = yaml::parse_stream(text);
        if let Some(error) = syntax {
            self.syntax_failed = true;
            self.errors.push((
                file_index,
                PolicyError {
                    file: file.to_string(),
                    line: Some(error.line),
                    document: Some(error.document),
                    object: None,
                    field: String::new(),
                    message: format!("invalid YAML: {}", error.message),
                },
            ));
        }
        for document in documents {
            let Some(root) = document.root else { continue };
            let mut cx = Cx {
                doc: DocRef {
                    file: file.to_string(),
                    file_index,
                    document: document.index,
                    object: None,
                },
                errors: Vec::new(),
                warnings: Vec::new(),
            };
            self.add_document(&mut cx, &root);
            self.errors.append(&mut cx.errors);
            self.warnings.append(&mut cx.warnings);
        }
    }

    fn add_document(&mut self, cx: &mut Cx, root: &Node) {
        let Some(top) = MapView::of(cx, root, "") else {
            return;
        };
        let Some(header) = read_header(cx, &top) else {
            return;
        };
        let origin = Origin {
            file: cx.doc.file.clone(),
            document: cx.doc.document,
            line: root.line,
        };
        // Duplicates: the first declaration wins; later ones are errors.
        let key = match header.kind {
            Kind::Mesh => (Kind::Mesh, String::new(), String::new()),
            kind => (kind, header.namespace.clone(), header.name.clone()),
        };
        if let Some(first) = self.declared.get(&key) {
            let message = match header.kind {
                Kind::Mesh => {
                    format!("a set holds one Mesh document; one is already defined at {first}")
                }
                kind => format!(
                    "{kind} {}/{} is already defined at {first}",
                    header.namespace, header.name
                ),
            };
            cx.err(header.name_line, &header.name_field, message);
            return;
        }
        self.declared.insert(key, origin.clone());

        let body = read_body(cx, &top, &header);
        let meta = ObjectMeta {
            name: header.name.clone(),
            namespace: header.namespace.clone(),
            origin: origin.clone(),
        };
        let errors_before = cx.errors.len();
        match header.kind {
            Kind::TrafficTarget => {
                let (target, references) = read_traffic_target(cx, &body, meta, header.version);
                self.references.extend(references);
                if cx.errors.len() == errors_before {
                    self.set.traffic_targets.push(target);
                }
            }
            Kind::HttpRouteGroup => {
                let group = read_http_route_group(cx, &body, meta);
                if cx.errors.len() == errors_before {
                    self.set.http_route_groups.push(group);
                }
            }
            Kind::TcpRoute => {
                let route = read_tcp_route(cx, &body, meta);
                if cx.errors.len() == errors_before {
                    self.set.tcp_routes.push(route);
                }
            }
            Kind::TrafficSplit => {
                let (split, references) = read_traffic_split(cx, &body, meta, header.version);
                self.references.extend(references);
                let valid = cx.errors.len() == errors_before;
                if valid
                    && split.matches.is_empty()
                    && let Some(first) = self.unmatched_splits.get(&split.service)
                {
                    cx.err(
                        body.line,
                        &body.field("service"),
                        format!(
                            "root service {} is already split by {first}; only one TrafficSplit \
                             without matches may name a root service",
                            split.service
                        ),
                    );
                } else if valid && split.matches.is_empty() {
                    let label = object_label(Kind::TrafficSplit, &header.namespace, &header.name);
                    self.unmatched_splits.insert(split.service.clone(), label);
                }
                if valid {
                    self.set.traffic_splits.push(split);
                }
            }
            Kind::Mesh => {
                let mesh = read_mesh(cx, &body, header.name.clone(), origin);
                if cx.errors.len() == errors_before {
                    self.set.mesh = Some(mesh);
                }
            }
            Kind::HttpRoutePolicy => {
                let Some(policy) = read_http_route_policy(cx, &body, meta) else {
                    return;
                };
                // The service is known even if other fields are wrong: report a second
                // policy for it either way.
                if let Some((first, first_origin)) = self.route_policies.get(&policy.service) {
                    cx.err(
                        body.get("service").map_or(body.line, |n| n.line),
                        &body.field("service"),
                        format!(
                            "service {} already has a policy, {first} at {first_origin}; a \
                             service takes one HTTPRoutePolicy",
                            policy.service
                        ),
                    );
                    return;
                }
                let label = object_label(Kind::HttpRoutePolicy, &header.namespace, &header.name);
                self.route_policies
                    .insert(policy.service.clone(), (label, origin));
                if cx.errors.len() == errors_before {
                    let set = &mut self.set;
                    set.route_policy_by_service
                        .insert(policy.service.clone(), set.http_route_policies.len());
                    set.http_route_policies.push(policy);
                }
            }
        }
    }

    fn finish(mut self) -> Result<PolicySet, Vec<PolicyError>> {
        // References are checked only when every file was readable; otherwise a route in the
        // unreadable part would be reported missing.
        if !self.syntax_failed {
            self.check_references();
        }
        if self.errors.is_empty() {
            let mut warnings = std::mem::take(&mut self.warnings);
            sort_located(&mut warnings);
            self.set.warnings = warnings.into_iter().map(|(_, w)| w).collect();
            Ok(self.set)
        } else {
            sort_located(&mut self.errors);
            Err(self.errors.into_iter().map(|(_, e)| e).collect())
        }
    }

    fn check_references(&mut self) {
        let groups: HashMap<(&str, &str), &HttpRouteGroup> = self
            .set
            .http_route_groups
            .iter()
            .map(|g| ((g.meta.namespace.as_str(), g.meta.name.as_str()), g))
            .collect();
        for reference in &self.references {
            let key = (
                reference.kind,
                reference.namespace.clone(),
                reference.name.clone(),
            );
            if !self.declared.contains_key(&key) {
                let elsewhere = self
                    .declared
                    .keys()
                    .filter(|(kind, _, name)| *kind == reference.kind && *name == reference.name)
                    .map(|(_, ns, _)| ns.as_str())
                    .min();
                let hint = match elsewhere {
                    Some(ns) => format!(
                        " (there is one in namespace {ns:?}; {} refer to routes in their own namespace)",
                        reference.referrer
                    ),
                    None => String::new(),
                };
                self.errors.push(reference.doc.error(
                    reference.line,
                    &reference.field,
                    format!(
                        "{} {}/{} is not defined in this set{hint}",
                        reference.kind, reference.namespace, reference.name
                    ),
                ));
                continue;
            }
            // A group that failed its own checks is already reported; skip its match names.
            if reference.kind != Kind::HttpRouteGroup {
                continue;
            }
            let Some(group) = groups.get(&(reference.namespace.as_str(), reference.name.as_str()))
            else {
                continue;
            };
            for (field, line, name) in &reference.matches {
                if !group.matches.iter().any(|m| &m.name == name) {
                    self.errors.push(reference.doc.error(
                        *line,
                        field,
                        format!(
                            "HTTPRouteGroup {}/{} has no match named {name:?}",
                            reference.namespace, reference.name
                        ),
                    ));
                }
            }
        }
    }
}

fn sort_located(items: &mut [(usize, PolicyError)]) {
    items.sort_by_key(|(file_index, e)| (*file_index, e.document, e.line));
}

/// `KIND NS/NAME`, or `Mesh NAME`.
fn object_label(kind: Kind, namespace: &str, name: &str) -> String {
    match kind {
        Kind::Mesh => format!("Mesh {name}"),
        _ => format!("{kind} {namespace}/{name}"),
    }
}

// ---- header and body -------------------------------------------------------------------------

const HEADER_FIELDS: [&str; 6] = [
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "spec",
];

fn read_header(cx: &mut Cx, top: &MapView<'_>) -> Option<Header> {
    let kind_node = top.required(cx, "kind")?;
    let kind_text = as_str(cx, kind_node, "kind")?;
    let Some(kind) = Kind::parse(kind_text) else {
        let message = match kind_text {
            "UDPRoute" => "UDPRoute is not supported: Weft carries TCP and HTTP only".to_string(),
            other => {
                let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "{other:?} is not a supported kind; expected {}",
                    one_of(&kinds)
                )
            }
        };
        cx.err(kind_node.line, "kind", message);
        return None;
    };
    cx.doc.object = Some(kind.to_string());

    // Name and namespace: under metadata, or at the top level (flattened shape).
    let metadata = match top.get("metadata") {
        Some(node) => Some(MapView::of(cx, node, "metadata")?),
        None => None,
    };
    let header_map = metadata.as_ref().unwrap_or(top);
    let name_node = match header_map.get("name") {
        Some(node) => node,
        None => {
            cx.err(header_map.line, &header_map.field("name"), "required");
            return None;
        }
    };
    let name_field = header_map.field("name");
    let name = as_name(cx, name_node, &name_field)?.to_string();
    let namespace = match (kind, header_map.get("namespace")) {
        (Kind::Mesh, Some(node)) => {
            cx.doc.object = Some(object_label(kind, "", &name));
            cx.err(
                node.line,
                &header_map.field("namespace"),
                "a Mesh applies to the whole mesh and takes no namespace",
            );
            return None;
        }
        (Kind::Mesh, None) => String::new(),
        (_, Some(node)) => as_name(cx, node, &header_map.field("namespace"))?.to_string(),
        (_, None) => DEFAULT_NAMESPACE.to_string(),
    };
    cx.doc.object = Some(object_label(kind, &namespace, &name));
    if let Some(metadata) = &metadata {
        metadata.deny_unknown(cx, &["name", "namespace", "labels", "annotations"], None);
        for key in ["name", "namespace"] {
            if let Some(node) = top.get(key) {
                cx.err(
                    node.line,
                    key,
                    format!("give {key} under metadata or at the top level, not both"),
                );
            }
        }
    }
    let version = read_api_version(cx, top, kind)?;
    Some(Header {
        kind,
        version,
        name,
        namespace,
        name_field,
        name_line: name_node.line,
    })
}

/// Reads `apiVersion` and returns the alpha version number to read the body as.
fn read_api_version(cx: &mut Cx, top: &MapView<'_>, kind: Kind) -> Option<u8> {
    let current = kind.api_version();
    let Some(node) = top.get("apiVersion") else {
        cx.warn(
            top.line,
            "apiVersion",
            format!("missing; read as {current}"),
        );
        return Some(kind.newest_alpha());
    };
    let text = as_str(cx, node, "apiVersion")?;
    let (group, version) = text.split_once('/').unwrap_or((text, ""));
    let (expected_group, _) = current.split_once('/').unwrap_or((current, ""));
    if group != expected_group {
        cx.err(
            node.line,
            "apiVersion",
            format!("{text:?} does not define {kind}; use {current}"),
        );
        return None;
    }
    let alpha = version
        .strip_prefix("v1alpha")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| (1..=kind.newest_alpha()).contains(n));
    match alpha {
        None => {
            cx.err(
                node.line,
                "apiVersion",
                format!("{text:?} is not supported; use {current}"),
            );
            None
        }
        Some(n) if n < kind.newest_alpha() => {
            cx.warn(
                node.line,
                "apiVersion",
                format!("{text} is read as {current}"),
            );
            Some(n)
        }
        Some(n) => Some(n),
    }
}

/// The body: `spec`, or the top-level body fields in the flattened shape.
fn read_body<'n>(cx: &mut Cx, top: &MapView<'n>, header: &Header) -> MapView<'n> {
    let body_fields = header.kind.body_fields(header.version);
    match top.get("spec") {
        Some(spec) => {
            let hint = "the body belongs under spec";
            top.deny_unknown(cx, &HEADER_FIELDS, Some((body_fields, hint)));
            let body =
                MapView::of(cx, spec, "spec").unwrap_or_else(|| MapView::empty(spec.line, "spec"));
            body.deny_unknown(cx, body_fields, None);
            body
        }
        None => {
            let allowed: Vec<&str> = HEADER_FIELDS.iter().chain(body_fields).copied().collect();
            top.deny_unknown(cx, &allowed, None);
            let flattened = top.only(body_fields);
            if flattened.entries.is_empty() {
                // Report missing fields where they are usually written.
                MapView::empty(top.line, "spec")
            } else {
                flattened
            }
        }
    }
}

// ---- the kinds -------------------------------------------------------------------------------

fn read_traffic_target(
    cx: &mut Cx,
    body: &MapView<'_>,
    meta: ObjectMeta,
    version: u8,
) -> (TrafficTarget, Vec<Reference>) {
    let mut target = TrafficTarget {
        destination: ServiceKey::new(meta.namespace.clone(), String::new()),
        meta,
        destination_port: None,
        rules: Vec::new(),
        sources: Vec::new(),
    };
    let namespace = target.meta.namespace.clone();
    let mut references = Vec::new();

    if let Some(node) = body.required(cx, "destination")
        && let Some(destination) = MapView::of(cx, node, &body.field("destination"))
    {
        let mut fields = vec!["kind", "name", "namespace"];
        if version <= 2 {
            fields.push("port");
        }
        destination.deny_unknown(cx, &fields, None);
        if let Some(kind) = destination.required(cx, "kind")
            && let Some(text) = as_str(cx, kind, &destination.field("kind"))
            && text != "ServiceAccount"
        {
            cx.err(
                kind.line,
                &destination.field("kind"),
                format!("{text:?} is not supported; a destination is a ServiceAccount"),
            );
        }
        if let Some(name) = destination.required(cx, "name")
            && let Some(name) = as_name(cx, name, &destination.field("name"))
        {
            target.destination.name = name.to_string();
        }
        if let Some(node) = destination.get("namespace")
            && let Some(ns) = as_name(cx, node, &destination.field("namespace"))
            && ns != namespace
        {
            cx.err(
                node.line,
                &destination.field("namespace"),
                format!(
                    "must be the TrafficTarget's own namespace {namespace:?}: only a service's \
                     owners grant access to it"
                ),
            );
        }
        if let Some(node) = destination.get("port") {
            // v1alpha1 declared the port as a string, so "9091" is accepted too.
            target.destination_port = as_port(cx, node, &destination.field("port"), true);
        }
    }

    let rules_key = if version == 1 { "specs" } else { "rules" };
    for (field, node) in body.required_list(cx, rules_key, "rule") {
        let Some(rule) = MapView::of(cx, node, &field) else {
            continue;
        };
        rule.deny_unknown(cx, &["kind", "name", "matches"], None);
        let kind = rule.required(cx, "kind").and_then(|node| {
            let text = as_str(cx, node, &rule.field("kind"))?;
            match text {
                "HTTPRouteGroup" => Some(RouteKind::HttpRouteGroup),
                "TCPRoute" => Some(RouteKind::TcpRoute),
                "UDPRoute" => {
                    cx.err(
                        node.line,
                        &rule.field("kind"),
                        "UDPRoute is not supported: Weft carries TCP and HTTP only",
                    );
                    None
                }
                other => {
                    cx.err(
                        node.line,
                        &rule.field("kind"),
                        format!(
                            "{other:?} is not a rule kind; expected HTTPRouteGroup or TCPRoute"
                        ),
                    );
                    None
                }
            }
        });
        let name_node = rule.required(cx, "name");
        let name = name_node.and_then(|node| as_name(cx, node, &rule.field("name")));
        let mut matches = Vec::new();
        if let Some(node) = rule.get("matches") {
            for (match_field, item) in list(cx, node, &rule.field("matches")) {
                if let Some(text) = as_match_name(cx, item, &match_field) {
                    matches.push((match_field, item.line, text.to_string()));
                }
            }
            if kind == Some(RouteKind::TcpRoute) && !matches.is_empty() {
                cx.err(
                    node.line,
                    &rule.field("matches"),
                    "matches applies only to HTTPRouteGroup rules",
                );
            }
        }
        if let (Some(kind), Some(name), Some(name_node)) = (kind, name, name_node) {
            references.push(Reference {
                doc: cx.doc.clone(),
                field: rule.field("name"),
                line: name_node.line,
                kind: kind.kind(),
                namespace: namespace.clone(),
                name: name.to_string(),
                matches: matches.clone(),
                referrer: "rules",
            });
            target.rules.push(TrafficTargetRule {
                kind,
                name: name.to_string(),
                matches: matches.into_iter().map(|(_, _, m)| m).collect(),
            });
        }
    }

    for (field, node) in body.required_list(cx, "sources", "source") {
        let Some(source) = MapView::of(cx, node, &field) else {
            continue;
        };
        source.deny_unknown(cx, &["kind", "name", "namespace"], None);
        let Some(kind_node) = source.required(cx, "kind") else {
            continue;
        };
        let Some(kind) = as_str(cx, kind_node, &source.field("kind")) else {
            continue;
        };
        match kind {
            "ServiceAccount" => {
                let name = source
                    .required(cx, "name")
                    .and_then(|n| as_name(cx, n, &source.field("name")));
                let ns = match source.get("namespace") {
                    Some(n) => as_name(cx, n, &source.field("namespace")),
                    None => Some(namespace.as_str()),
                };
                if let (Some(name), Some(ns)) = (name, ns) {
                    target
                        .sources
                        .push(Subject::ServiceAccount(ServiceKey::new(ns, name)));
                }
            }
            "SPIFFEID" => {
                if let Some(node) = source.get("namespace") {
                    cx.err(
                        node.line,
                        &source.field("namespace"),
                        "does not apply to a SPIFFEID source",
                    );
                }
                let Some(node) = source.required(cx, "name") else {
                    continue;
                };
                let Some(text) = as_str(cx, node, &source.field("name")) else {
                    continue;
                };
                match SpiffeId::parse(text) {
                    Ok(id) => target.sources.push(Subject::SpiffeId(id)),
                    Err(e) => cx.err(
                        node.line,
                        &source.field("name"),
                        format!("{text:?} is not a SPIFFE ID: {e}"),
                    ),
                }
            }
            other => cx.err(
                kind_node.line,
                &source.field("kind"),
                format!("{other:?} is not a source kind; expected ServiceAccount or SPIFFEID"),
            ),
        }
    }
    (target, references)
}

fn read_http_route_group(cx: &mut Cx, body: &MapView<'_>, meta: ObjectMeta) -> HttpRouteGroup {
    let mut group = HttpRouteGroup {
        meta,
        matches: Vec::new(),
    };
    let mut names: HashMap<String, String> = HashMap::new();
    for (field, node) in body.required_list(cx, "matches", "match") {
        let Some(m) = MapView::of(cx, node, &field) else {
            continue;
        };
        m.deny_unknown(cx, &["name", "pathRegex", "methods", "headers"], None);
        let name = m
            .required(cx, "name")
            .and_then(|n| as_match_name(cx, n, &m.field("name")).map(|t| (n.line, t)));
        if let Some((line, name)) = name {
            if let Some(first) = names.get(name) {
                cx.err(
                    line,
                    &m.field("name"),
                    format!("{name:?} is already the name of {first}"),
                );
            } else {
                names.insert(name.to_string(), field.clone());
            }
        }
        let path_regex = m.get("pathRegex").and_then(|node| {
            let pattern = as_str(cx, node, &m.field("pathRegex"))?;
            check_regex(cx, node, &m.field("pathRegex"), pattern)?;
            Some(pattern.to_string())
        });
        let mut methods = Vec::new();
        if let Some(node) = m.get("methods") {
            let items = list(cx, node, &m.field("methods"));
            if items.is_empty() && matches!(node.value, Value::Seq(_)) {
                cx.err(
                    node.line,
                    &m.field("methods"),
                    "an empty list matches no request; leave methods out to match every method",
                );
            }
            for (method_field, item) in items {
                let Some(text) = as_str(cx, item, &method_field) else {
                    continue;
                };
                match HttpMethod::parse(text) {
                    Some(method) => methods.push(method),
                    None => cx.err(
                        item.line,
                        &method_field,
                        format!(
                            "{text:?} is not an SMI method; expected *, GET, HEAD, PUT, POST, \
                             DELETE, CONNECT, OPTIONS, TRACE or PATCH (case-sensitive)"
                        ),
                    ),
                }
            }
        }
        let headers = m
            .get("headers")
            .map(|node| read_headers(cx, node, &m.field("headers")))
            .unwrap_or_default();
        if let Some((_, name)) = name {
            group.matches.push(HttpMatch {
                name: name.to_string(),
                path_regex,
                methods,
                headers,
            });
        }
    }
    group
}

/// Headers as a map (`{user-agent: re}`) or a list of single-key maps (`[{user-agent: re}]`).
fn read_headers(cx: &mut Cx, node: &Node, field: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, &Node, &Node)> = Vec::new();
    match &node.value {
        Value::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_field = index(field, i);
                let Some(map) = MapView::of(cx, item, &item_field) else {
                    continue;
                };
                if map.entries.len() != 1 {
                    cx.err(
                        item.line,
                        &item_field,
                        "each headers item must be a mapping with exactly one header",
                    );
                    continue;
                }
                let (key, key_node, value) = map.entries[0];
                pairs.push((join(&item_field, key), key_node, value));
            }
        }
        _ => {
            if let Some(map) = MapView::of(cx, node, field) {
                for (key, key_node, value) in map.entries {
                    pairs.push((join(field, key), key_node, value));
                }
            }
        }
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for (header_field, key_node, value) in pairs {
        let Value::Scalar { text: raw, .. } = &key_node.value else {
            continue;
        };
        let name = raw.to_ascii_lowercase();
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            cx.err(
                key_node.line,
                &header_field,
                format!("{raw:?} is not an HTTP header name"),
            );
            continue;
        }
        if headers.iter().any(|(n, _)| *n == name) {
            cx.err(
                key_node.line,
                &header_field,
                format!("header {name:?} is listed twice (names are case-insensitive)"),
            );
            continue;
        }
        if value.is_null() {
            cx.err(value.line, &header_field, "required: a regex for the value");
            continue;
        }
        let Some(pattern) = as_str(cx, value, &header_field) else {
            continue;
        };
        if check_regex(cx, value, &header_field, pattern).is_some() {
            headers.push((name, pattern.to_string()));
        }
    }
    headers
}

fn read_tcp_route(cx: &mut Cx, body: &MapView<'_>, meta: ObjectMeta) -> TcpRoute {
    let mut route = TcpRoute {
        meta,
        ports: Vec::new(),
    };
    // Older TCPRoutes have no matches, and absent ports mean every port (research §1.4.2).
    let Some(node) = body.get("matches") else {
        return route;
    };
    let field = body.field("matches");
    if matches!(node.value, Value::Seq(_)) {
        cx.err(
            node.line,
            &field,
            "expected a mapping such as {ports: [8080]} (a TCPRoute's matches is one object, \
             unlike an HTTPRouteGroup's list)",
        );
        return route;
    }
    let Some(matches) = MapView::of(cx, node, &field) else {
        return route;
    };
    matches.deny_unknown(cx, &["name", "ports"], None);
    if let Some(name) = matches.get("name") {
        // Present in the Go type and unused by SMI; checked only for its type.
        as_str(cx, name, &matches.field("name"));
    }
    if let Some(ports) = matches.get("ports") {
        for (port_field, item) in list(cx, ports, &matches.field("ports")) {
            let Some(port) = as_port(cx, item, &port_field, false) else {
                continue;
            };
            if route.ports.contains(&port) {
                cx.err(
                    item.line,
                    &port_field,
                    format!("port {port} is listed twice"),
                );
            } else {
                route.ports.push(port);
            }
        }
    }
    route
}

fn read_traffic_split(
    cx: &mut Cx,
    body: &MapView<'_>,
    meta: ObjectMeta,
    version: u8,
) -> (TrafficSplit, Vec<Reference>) {
    let namespace = meta.namespace.clone();
    let service = body
        .required(cx, "service")
        .and_then(|n| as_name(cx, n, &body.field("service")))
        .unwrap_or_default()
        .to_string();
    let mut split = TrafficSplit {
        service: ServiceKey::new(namespace.clone(), service.clone()),
        meta,
        backends: Vec::new(),
        matches: Vec::new(),
    };
    // v1alpha1 weights are Kubernetes quantities: "500m" is 0.5. When any weight uses milli-units,
    // all of the split's weights are read in milli-units, which keeps them relative.
    let mut weights: Vec<(String, usize, u64, bool)> = Vec::new();
    for (field, node) in body.required_list(cx, "backends", "backend") {
        let Some(backend) = MapView::of(cx, node, &field) else {
            continue;
        };
        backend.deny_unknown(cx, &["service", "weight"], None);
        let name = backend
            .required(cx, "service")
            .and_then(|n| as_name(cx, n, &backend.field("service")).map(|t| (n.line, t)));
        if let Some((line, name)) = name {
            if name == service {
                cx.err(
                    line,
                    &backend.field("service"),
                    "a backend may not be the root service itself",
                );
            } else if split.backends.iter().any(|b| b.service.name == name) {
                cx.err(
                    line,
                    &backend.field("service"),
                    format!("backend {name:?} is listed twice"),
                );
            }
        }
        let weight = backend.required(cx, "weight").and_then(|n| {
            read_weight(cx, n, &backend.field("weight"), version).map(|w| (n.line, w))
        });
        if let (Some((_, name)), Some((line, (weight, milli)))) = (name, weight) {
            weights.push((backend.field("weight"), line, weight, milli));
            split.backends.push(SplitBackend {
                service: ServiceKey::new(namespace.clone(), name),
                weight: 0,
            });
        }
    }
    let any_milli = weights.iter().any(|(_, _, _, milli)| *milli);
    for (backend, (field, line, weight, milli)) in split.backends.iter_mut().zip(&weights) {
        let weight = if any_milli && !milli {
            weight.saturating_mul(1000)
        } else {
            *weight
        };
        match u32::try_from(weight) {
            Ok(w) if w <= MAX_WEIGHT => backend.weight = w,
            _ => cx.err(
                *line,
                field,
                format!("{weight} milli-units is above the largest weight, {MAX_WEIGHT}"),
            ),
        }
    }
    if !split.backends.is_empty() && split.backends.iter().all(|b| b.weight == 0) {
        cx.warn(
            body.get("backends").map_or(body.line, |n| n.line),
            &body.field("backends"),
            format!(
                "every weight is 0: requests go to the root service {} itself",
                split.service
            ),
        );
    }

    let mut references = Vec::new();
    if let Some(node) = body.get("matches") {
        for (field, item) in list(cx, node, &body.field("matches")) {
            let Some(m) = MapView::of(cx, item, &field) else {
                continue;
            };
            m.deny_unknown(cx, &["kind", "name", "apiGroup"], None);
            let kind_ok = match m.required(cx, "kind") {
                Some(kind) => match as_str(cx, kind, &m.field("kind")) {
                    Some("HTTPRouteGroup") => true,
                    Some(text) => {
                        cx.err(
                            kind.line,
                            &m.field("kind"),
                            format!(
                                "{text:?} is not supported; a TrafficSplit matches HTTPRouteGroups"
                            ),
                        );
                        false
                    }
                    None => false,
                },
                None => false,
            };
            if let Some(group) = m.get("apiGroup")
                && let Some(text) = as_str(cx, group, &m.field("apiGroup"))
                && text != "specs.smi-spec.io"
            {
                cx.err(
                    group.line,
                    &m.field("apiGroup"),
                    format!("{text:?} is not the HTTPRouteGroup API group specs.smi-spec.io"),
                );
            }
            if let Some(node) = m.required(cx, "name")
                && let Some(name) = as_name(cx, node, &m.field("name"))
                && kind_ok
            {
                references.push(Reference {
                    doc: cx.doc.clone(),
                    field: m.field("name"),
                    line: node.line,
                    kind: Kind::HttpRouteGroup,
                    namespace: namespace.clone(),
                    name: name.to_string(),
                    matches: Vec::new(),
                    referrer: "TrafficSplit matches",
                });
                split.matches.push(name.to_string());
            }
        }
    }
    (split, references)
}

/// A weight: a whole number, or in v1alpha1 also milli-units (`"500m"`). Returns the number
/// and whether it is in milli-units.
fn read_weight(cx: &mut Cx, node: &Node, field: &str, version: u8) -> Option<(u64, bool)> {
    if version == 1
        && let Value::Scalar { text, .. } = &node.value
        && let Some(milli) = text.strip_suffix('m')
        && !milli.is_empty()
        && milli.bytes().all(|b| b.is_ascii_digit())
    {
        return match milli.parse::<u64>() {
            Ok(n) => Some((n, true)),
            Err(_) => {
                cx.err(node.line, field, format!("{text:?} is too large"));
                None
            }
        };
    }
    let quoted_ok = version == 1;
    let weight = as_uint(cx, node, field, quoted_ok)?;
    if weight > u64::from(MAX_WEIGHT) {
        cx.err(
            node.line,
            field,
            format!("{weight} is above the largest weight, {MAX_WEIGHT}"),
        );
        return None;
    }
    Some((weight, false))
}

fn read_mesh(cx: &mut Cx, body: &MapView<'_>, name: String, origin: Origin) -> Mesh {
    let mut mesh = Mesh {
        name,
        origin,
        default: DefaultPolicy::Allow,
        path_regex_match: PathRegexMatch::Prefix,
    };
    if let Some(node) = body.get("default")
        && let Some(text) = as_str(cx, node, &body.field("default"))
    {
        match text {
            "allow" => mesh.default = DefaultPolicy::Allow,
            "deny" => mesh.default = DefaultPolicy::Deny,
            other => cx.err(
                node.line,
                &body.field("default"),
                format!("{other:?} is not a default; expected allow or deny"),
            ),
        }
    }
    if let Some(node) = body.get("pathRegexMatch")
        && let Some(text) = as_str(cx, node, &body.field("pathRegexMatch"))
    {
        match text {
            "prefix" => mesh.path_regex_match = PathRegexMatch::Prefix,
            "full" => mesh.path_regex_match = PathRegexMatch::Full,
            other => cx.err(
                node.line,
                &body.field("pathRegexMatch"),
                format!("{other:?} is not a path match; expected prefix or full"),
            ),
        }
    }
    mesh
}

/// Reads an HTTPRoutePolicy; `None` when its service is unreadable (errors are reported).
fn read_http_route_policy(
    cx: &mut Cx,
    body: &MapView<'_>,
    meta: ObjectMeta,
) -> Option<HttpRoutePolicy> {
    let service = body
        .required(cx, "service")
        .and_then(|n| as_name(cx, n, &body.field("service")));
    let timeouts = match body.get("timeouts") {
        Some(node) => read_timeouts(cx, node, &body.field("timeouts")),
        None => Timeouts::default(),
    };
    let retry = body
        .get("retry")
        .map(|node| read_retry(cx, node, &body.field("retry")));
    let budget = match body.get("retryBudget") {
        Some(node) => {
            if retry.is_none() {
                cx.warn(
                    node.line,
                    &body.field("retryBudget"),
                    "has no effect without retry",
                );
            }
            read_retry_budget(cx, node, &body.field("retryBudget"))
        }
        None => RetryBudget::default(),
    };
    Some(HttpRoutePolicy {
        service: ServiceKey::new(meta.namespace.clone(), service?),
        meta,
        timeouts,
        retry,
        budget,
    })
}

fn read_timeouts(cx: &mut Cx, node: &Node, field: &str) -> Timeouts {
    let mut timeouts = Timeouts::default();
    let Some(map) = MapView::of(cx, node, field) else {
        return timeouts;
    };
    map.deny_unknown(cx, &["request", "backendRequest"], None);
    let request = map
        .get("request")
        .and_then(|n| as_duration(cx, n, &map.field("request")));
    let backend_node = map.get("backendRequest");
    let backend = backend_node.and_then(|n| as_duration(cx, n, &map.field("backendRequest")));
    timeouts.request = request.map(|(_, d)| d).filter(|d| !d.is_zero());
    timeouts.backend_request = backend.map(|(_, d)| d).filter(|d| !d.is_zero());
    // 0s disables either timeout, so only two non-zero values are compared.
    if let (Some((request_text, request)), Some((backend_text, backend)), Some(node)) =
        (request, backend, backend_node)
        && !request.is_zero()
        && backend > request
    {
        cx.err(
            node.line,
            &map.field("backendRequest"),
            format!(
                "{backend_text} is longer than the request timeout {request_text}; each \
                 attempt must fit in the whole request"
            ),
        );
    }
    timeouts
}

fn read_retry(cx: &mut Cx, node: &Node, field: &str) -> Retry {
    let mut retry = Retry::default();
    let Some(map) = MapView::of(cx, node, field) else {
        return retry;
    };
    map.deny_unknown(cx, &["attempts", "codes", "backoff", "nonIdempotent"], None);
    if let Some(node) = map.get("attempts")
        && let Some(n) = as_uint(cx, node, &map.field("attempts"), false)
    {
        match u32::try_from(n) {
            Ok(n) if (1..=MAX_RETRY_ATTEMPTS).contains(&n) => retry.attempts = n,
            _ => cx.err(
                node.line,
                &map.field("attempts"),
                format!(
                    "{n} is not a retry count (1-{MAX_RETRY_ATTEMPTS}: retries after the first try)"
                ),
            ),
        }
    }
    if let Some(node) = map.get("codes") {
        retry.codes.clear();
        for (code_field, item) in list(cx, node, &map.field("codes")) {
            let Some(n) = as_uint(cx, item, &code_field, false) else {
                continue;
            };
            match u16::try_from(n) {
                Ok(code) if (400..=599).contains(&code) => {
                    if retry.codes.contains(&code) {
                        cx.err(
                            item.line,
                            &code_field,
                            format!("code {code} is listed twice"),
                        );
                    } else {
                        retry.codes.push(code);
                    }
                }
                _ => cx.err(
                    item.line,
                    &code_field,
                    format!("{n} is not a retryable status code (400-599)"),
                ),
            }
        }
    }
    if let Some(node) = map.get("backoff")
        && let Some((_, backoff)) = as_duration(cx, node, &map.field("backoff"))
    {
        retry.backoff = backoff;
    }
    if let Some(node) = map.get("nonIdempotent")
        && let Some(flag) = as_bool(cx, node, &map.field("nonIdempotent"))
    {
        retry.non_idempotent = flag;
    }
    retry
}

fn read_retry_budget(cx: &mut Cx, node: &Node, field: &str) -> RetryBudget {
    let mut budget = RetryBudget::default();
    let Some(map) = MapView::of(cx, node, field) else {
        return budget;
    };
    map.deny_unknown(cx, &["percent", "minRetriesPerSecond"], None);
    if let Some(node) = map.get("percent")
        && let Some(n) = as_uint(cx, node, &map.field("percent"), false)
    {
        match u32::try_from(n) {
            Ok(n) if n <= 100 => budget.percent = n,
            _ => cx.err(
                node.line,
                &map.field("percent"),
                format!("{n} is not a percentage (0-100)"),
            ),
        }
    }
    if let Some(node) = map.get("minRetriesPerSecond")
        && let Some(n) = as_uint(cx, node, &map.field("minRetriesPerSecond"), false)
    {
        match u32::try_from(n) {
            Ok(n) => budget.min_per_second = n,
            Err(_) => cx.err(
                node.line,
                &map.field("minRetriesPerSecond"),
                format!("{n} is above the largest value, {}", u32::MAX),
            ),
        }
    }
    budget
}

/// Parses a Gateway API duration (GEP-2257): 1 to 4 groups of 1 to 5 digits and a unit `h`,
/// `m`, `s` or `ms`, matching `^([0-9]{1,5}(h|m|s|ms)){1,4}$`; groups add up, in any order
/// (`1h2m3s4ms`, `1m30s`, `500ms`, `0s`). Anything else, such as `1.5s`, `5`, `100000s`,
/// `-1s`, `1 s` or `1us`, is `None`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let bytes = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut groups = 0;
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        // At most 5 digits: always fits.
        let n: u64 = text[i..i + digits].parse().ok()?;
        i += digits;
        let (unit, len) = match &bytes[i..] {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b'h', ..] => (Duration::from_secs(3600), 1),
            [b'm', ..] => (Duration::from_secs(60), 1),
            [b's', ..] => (Duration::from_secs(1), 1),
            _ => return None,
        };
        i += len;
        groups += 1;
        if groups > 4 {
            return None;
        }
        total += unit * u32::try_from(n).ok()?;
    }
    (groups > 0).then_some(total)
}

/// A duration in GEP-2257's format: the text as written and its value.
fn as_duration<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<(&'n str, Duration)> {
    let text = as_str(cx, node, path)?;
    match parse_duration(text) {
        Some(duration) => Some((text, duration)),
        None => {
            cx.err(
                node.line,
                path,
                format!(
                    "{text:?} is not a duration: use 1 to 4 groups of up to 5 digits and a unit \
                     h, m, s or ms, such as 10s, 1m30s or 250ms (Gateway API GEP-2257)"
                ),
            );
            None
        }
    }
}

/// A plain `true` or `false`.
fn as_bool(cx: &mut Cx, node: &Node, path: &str) -> Option<bool> {
    match &node.value {
        Value::Scalar {
            text,
            quoted: false,
        } if text == "true" => Some(true),
        Value::Scalar {
            text,
            quoted: false,
        } if text == "false" => Some(false),
        _ => {
            let found = match &node.value {
                Value::Scalar { text, quoted: true } => format!("the string {text:?}"),
                _ => node.describe(),
            };
            cx.err(
                node.line,
                path,
                format!("expected true or false, found {found}"),
            );
            None
        }
    }
}

// ---- typed access to the YAML tree -----------------------------------------------------------

/// A mapping whose keys are strings, with the field path it sits at.
struct MapView<'n> {
    line: usize,
    path: String,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> MapView<'n> {
    /// Views `node` as a mapping; reports non-mappings, non-string keys and duplicate keys.
    fn of(cx: &mut Cx, node: &'n Node, path: &str) -> Option<MapView<'n>> {
        let Value::Map(pairs) = &node.value else {
            let found = node.describe();
            cx.err(
                node.line,
                path,
                format!("expected a mapping, found {found}"),
            );
            return None;
        };
        let mut entries: Vec<(&'n str, &'n Node, &'n Node)> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            let Value::Scalar { text, .. } = &key.value else {
                cx.err(key.line, path, "mapping keys must be strings");
                continue;
            };
            if entries.iter().any(|(k, _, _)| k == text) {
                cx.err(key.line, &join(path, text), "duplicate key");
                continue;
            }
            entries.push((text.as_str(), key, value));
        }
        Some(MapView {
            line: node.line,
            path: path.to_string(),
            entries,
        })
    }

    fn empty(line: usize, path: &str) -> MapView<'n> {
        MapView {
            line,
            path: path.to_string(),
            entries: Vec::new(),
        }
    }

    /// The same mapping restricted to some keys, at the same path.
    fn only(&self, keys: &[&str]) -> MapView<'n> {
        MapView {
            line: self.line,
            path: self.path.clone(),
            entries: self
                .entries
                .iter()
                .filter(|(k, _, _)| keys.contains(k))
                .copied()
                .collect(),
        }
    }

    /// The value at `key`; null counts as absent.
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, v)| *k == key && !v.is_null())
            .map(|(_, _, v)| *v)
    }

    /// The value at `key`, or a `required` error located at this mapping.
    fn required(&self, cx: &mut Cx, key: &str) -> Option<&'n Node> {
        let value = self.get(key);
        if value.is_none() {
            cx.err(self.line, &self.field(key), "required");
        }
        value
    }

    /// A required, non-empty list at `key`, as (field path, item) pairs.
    fn required_list(&self, cx: &mut Cx, key: &str, what: &str) -> Vec<(String, &'n Node)> {
        let Some(node) = self.required(cx, key) else {
            return Vec::new();
        };
        let items = list(cx, node, &self.field(key));
        if items.is_empty() && matches!(node.value, Value::Seq(_)) {
            cx.err(
                node.line,
                &self.field(key),
                format!("at least one {what} is required"),
            );
        }
        items
    }

    /// Reports keys outside `allowed`; keys in `hint.0` get the hint `hint.1`.
    fn deny_unknown(&self, cx: &mut Cx, allowed: &[&str], hint: Option<(&[&str], &str)>) {
        for (key, key_node, _) in &self.entries {
            if allowed.contains(key) {
                continue;
            }
            let message = match hint {
                Some((keys, hint)) if keys.contains(key) => format!("unknown field ({hint})"),
                _ => format!("unknown field; expected {}", one_of(allowed)),
            };
            cx.err(key_node.line, &self.field(key), message);
        }
    }

    fn field(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// `a, b or c`.
fn one_of(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The items of a list, with their field paths; reports a non-list.
fn list<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Vec<(String, &'n Node)> {
    match &node.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (index(path, i), item))
            .collect(),
        _ => {
            let found = node.describe();
            cx.err(node.line, path, format!("expected a list, found {found}"));
            Vec::new()
        }
    }
}

/// A scalar's text (a plain `8080` or `true` is taken as written).
fn as_str<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n str> {
    match &node.value {
        Value::Scalar { text, .. } if !node.is_null() => Some(text),
        _ => {
            let found = node.describe();
            cx.err(node.line, path, format!("expected a string, found {found}"));
            None
        }
    }
}

/// A non-negative whole number; quoted digits only when `quoted_ok`.
fn as_uint(cx: &mut Cx, node: &Node, path: &str, quoted_ok: bool) -> Option<u64> {
    let Value::Scalar { text, quoted } = &node.value else {
        let found = node.describe();
        cx.err(
            node.line,
            path,
            format!("expected a whole number, found {found}"),
        );
        return None;
    };
    if *quoted && !quoted_ok {
        cx.err(
            node.line,
            path,
            format!("expected a whole number, found the string {text:?}"),
        );
        return None;
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        cx.err(
            node.line,
            path,
            format!("expected a whole number, found {text:?}"),
        );
        return None;
    }
    match text.parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) => {
            cx.err(node.line, path, format!("{text} is too large"));
            None
        }
    }
}

fn as_port(cx: &mut Cx, node: &Node, path: &str, quoted_ok: bool) -> Option<u16> {
    let n = as_uint(cx, node, path, quoted_ok)?;
    match u16::try_from(n) {
        Ok(port) if port > 0 => Some(port),
        _ => {
            cx.err(node.line, path, format!("{n} is not a port (1-65535)"));
            None
        }
    }
}

/// A name that becomes a service, namespace or SPIFFE path segment: the same rule as
/// service names in `weft.toml`.
fn as_name<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n str> {
    let text = as_str(cx, node, path)?;
    let valid_chars = text.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    });
    let valid = !text.is_empty()
        && text.len() <= 63
        && valid_chars
        && text != "."
        && text != ".."
        && !text.starts_with(['-', '.']);
    if valid {
        Some(text)
    } else {
        cx.err(
            node.line,
            path,
            format!(
                "{text:?} is not a valid name: use 1 to 63 lowercase letters, digits, '-', '_' \
                 or '.', not starting with '-' or '.'"
            ),
        );
        None
    }
}

/// An HTTPRouteGroup match name: not an identity, so upper case is allowed (`testMatch`).
fn as_match_name<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n str> {
    let text = as_str(cx, node, path)?;
    let valid = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Some(text)
    } else {
        cx.err(
            node.line,
            path,
            format!("{text:?} is not a valid match name: use letters, digits, '-', '_' or '.'"),
        );
        None
    }
}

fn check_regex(cx: &mut Cx, node: &Node, path: &str, pattern: &str) -> Option<()> {
    match matcher::compile(pattern, Anchor::Full) {
        Ok(_) => Some(()),
        Err(e) => {
            cx.err(node.line, path, format!("invalid regex {pattern:?}: {e}"));
            None
        }
    }
}
