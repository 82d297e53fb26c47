//! `weft.toml`: the one config file of an agent, parsed once into validated types.
//!
//! Nothing downstream re-parses strings: addresses, durations, names and the trust domain
//! are typed here. Every error names the file, the line and the key (see [`ConfigError`]).
//! Which settings SIGHUP may change live is decided in [`Config::reload_changes`].

mod source;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use weft_ca::TrustDomain;
use weft_discovery::{Protocol, ServiceKey};

use source::Source;
pub use source::{ConfigError, KeyPath};

/// Where the agent reads its config unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/weft/weft.toml";

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[node]`.
    pub node: NodeConfig,
    /// `[gossip]`.
    pub gossip: GossipConfig,
    /// `[tunnel]`.
    pub tunnel: TunnelConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[identity]`.
    pub identity: IdentityConfig,
    /// `[ca]`, when this host is a CA host (`enabled = true`).
    pub ca: Option<CaHostConfig>,
    /// `[[service]]`: services this host runs.
    pub services: Vec<ServiceConfig>,
    /// `[[upstream]]`: local ports that reach mesh services.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[outbound]`.
    pub outbound: OutboundConfig,
    /// `[policy]`.
    pub policy: PolicyConfig,
}

/// `[policy]`: which policy bundles this agent accepts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyConfig {
    /// Bundles older than this version are refused, even if correctly signed (an operator's
    /// floor against rollback to an old policy; 0 accepts all).
    pub min_version: u64,
}

/// `[[upstream]]`: a local listener whose connections go to a mesh service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The destination service.
    pub service: ServiceKey,
    /// Local address apps connect to.
    pub listen: SocketAddr,
    /// The local service the connections act for (their source identity), if any.
    pub from: Option<ServiceKey>,
}

/// `[outbound]`: how local apps reach the mesh besides upstream listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    /// HTTP proxy address (`HTTP_PROXY`-style), or `None` when turned off.
    pub http_proxy: Option<SocketAddr>,
}

/// `[node]`: who this host is.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Node name, unique in the mesh (default: the hostname).
    pub name: String,
    /// SPIFFE trust domain; also the gossip cluster name.
    pub trust_domain: TrustDomain,
    /// State directory.
    pub data_dir: PathBuf,
    /// Labels published in gossip (e.g. `zone`).
    pub labels: BTreeMap<String, String>,
    /// How long in-flight connections may run after SIGTERM before they are cut.
    pub drain_timeout: Duration,
    /// Threads of the agent's async runtime.
    pub worker_threads: usize,
}

/// `[gossip]`: membership and discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipConfig {
    /// Local UDP address.
    pub bind: SocketAddr,
    /// Address peers use to reach this agent.
    pub advertise: SocketAddr,
    /// Seed members, `host:port`.
    pub seeds: Vec<String>,
    /// Keyring file: one base64 key a line; the first encrypts, all decrypt.
    pub keyring: PathBuf,
    /// Gossip round period.
    pub interval: Duration,
    /// How long a dead or left member stays listed before it is forgotten.
    pub dead_grace: Duration,
    /// Largest UDP datagram sent; larger gossip messages are split into sealed fragments.
    pub max_datagram: usize,
}

/// `[tunnel]`: the QUIC tunnel endpoint (advertised in gossip).
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelConfig {
    /// Local UDP address.
    pub bind: SocketAddr,
    /// Address peers use to reach it.
    pub advertise: SocketAddr,
}

/// `[admin]`: the local admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Unix socket of the JSON admin API (mode 0600).
    pub socket: PathBuf,
    /// HTTP address serving `/metrics`, `/ready`, `/live`.
    pub http: SocketAddr,
}

/// `[identity]`: where this host's SPIFFE identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// PEM file of the trust domain's root certificate(s).
    pub trust_bundle: PathBuf,
    /// Join token file, read once on first start when no node identity exists yet.
    pub join_token: PathBuf,
    /// Lifetime asked for service SVIDs.
    pub svid_ttl: Duration,
    /// Lifetime of node SVIDs this host issues, when it is a CA host.
    pub node_svid_ttl: Duration,
}

/// `[ca]`: this host issues identities with its intermediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaHostConfig {
    /// Intermediate certificate (PEM).
    pub cert: PathBuf,
    /// Intermediate key (PEM, mode 0600).
    pub key: PathBuf,
}

/// `[log]`: what the agent logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `weft=debug,info` (`RUST_LOG` overrides it).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
    /// Where HTTP access log lines (JSON) go; `None`: no access log.
    pub access_log: Option<AccessLogTarget>,
}

/// Destination of the HTTP access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Standard output (journald when run by systemd).
    Stdout,
    /// Appended to this file (created 0640).
    File(PathBuf),
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds timestamps).
    Text,
    /// One JSON object a line.
    Json,
}

/// `[[service]]`: a service this host runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Namespace and name.
    pub key: ServiceKey,
    /// Where the app listens on this host.
    pub address: SocketAddr,
    /// Application protocol.
    pub protocol: Protocol,
    /// Relative load-balancing weight.
    pub weight: u32,
    /// Local health check, if any.
    pub check: Option<CheckConfig>,
    /// Requests per second this host's instance takes from the mesh (HTTP services; more
    /// get 429), if limited.
    pub rate_limit: Option<RateLimit>,
}

/// A token-bucket request rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub rps: u32,
    /// Requests allowed at once above the rate.
    pub burst: u32,
}

/// A local health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    /// What to probe.
    pub kind: CheckKind,
    /// Time between probes.
    pub interval: Duration,
    /// How long one probe may take.
    pub timeout: Duration,
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// TCP connect to the service address.
    Tcp,
    /// HTTP GET of this path on the service address; 2xx and 3xx pass.
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
    /// Run a command; exit status 0 passes.
    Exec {
        /// Program and arguments (no shell).
        argv: Vec<String>,
    },
}

/// Which live settings changed between two valid configs, and which changes need a restart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadChanges {
    /// Services or their checks changed.
    pub services: bool,
    /// The log level changed.
    pub log_level: bool,
    /// Keys whose new values only take effect after a restart.
    pub need_restart: Vec<&'static str>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Absolute, so a reload finds the same file whatever the working directory is.
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: KeyPath::default(),
            message: format!("cannot read config: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` is used in errors and to resolve nothing else.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let source = Source::new(path, text);
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|e| source.syntax_error(e))?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(deserializer).map_err(|e| source.serde_error(e))?;
        raw.validate(path, &source)
    }

    /// Compares a new config with this (running) one for a SIGHUP reload.
    pub fn reload_changes(&self, new: &Config) -> ReloadChanges {
        let mut need_restart = Vec::new();
        if self.node != new.node {
            need_restart.push("node");
        }
        if self.gossip != new.gossip {
            need_restart.push("gossip");
        }
        if self.tunnel != new.tunnel {
            need_restart.push("tunnel");
        }
        if self.admin != new.admin {
            need_restart.push("admin");
        }
        if self.log.format != new.log.format {
            need_restart.push("log.format");
        }
        if self.log.access_log != new.log.access_log {
            need_restart.push("log.access_log");
        }
        if self.identity != new.identity {
            need_restart.push("identity");
        }
        if self.ca != new.ca {
            need_restart.push("ca");
        }
        if self.outbound != new.outbound {
            need_restart.push("outbound");
        }
        if self.policy != new.policy {
            need_restart.push("policy");
        }
        ReloadChanges {
            services: self.services != new.services,
            log_level: self.log.level != new.log.level,
            need_restart,
        }
    }
}

// ---- the file as written ------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    gossip: RawGossip,
    #[serde(default)]
    tunnel: RawTunnel,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    identity: RawIdentity,
    ca: Option<RawCa>,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    outbound: RawOutbound,
    #[serde(default)]
    policy: RawPolicy,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    min_version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    service: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(deserialize_with = "socket_addr")]
    listen: SocketAddr,
    from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    #[serde(default = "default_http_proxy")]
    http_proxy: String,
}

impl Default for RawOutbound {
    fn default() -> Self {
        RawOutbound {
            http_proxy: default_http_proxy(),
        }
    }
}

fn default_http_proxy() -> String {
    "127.0.0.1:7481".into()
}

/// Most runtime threads `node.worker_threads` accepts.
const MAX_WORKER_THREADS: usize = 64;

/// One runtime thread: per request, a second thread costs more in wake-ups between threads
/// than it adds (docs/benchmarks.md); busy hosts and CA hosts of large fleets raise it.
const DEFAULT_WORKER_THREADS: usize = 1;

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default = "default_trust_bundle")]
    trust_bundle: PathBuf,
    #[serde(default = "default_join_token")]
    join_token: PathBuf,
    #[serde(default = "default_svid_ttl", deserialize_with = "duration")]
    svid_ttl: Duration,
    #[serde(default = "default_node_svid_ttl", deserialize_with = "duration")]
    node_svid_ttl: Duration,
}

impl Default for RawIdentity {
    fn default() -> Self {
        RawIdentity {
            trust_bundle: default_trust_bundle(),
            join_token: default_join_token(),
            svid_ttl: default_svid_ttl(),
            node_svid_ttl: default_node_svid_ttl(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCa {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "default_ca_cert")]
    cert: PathBuf,
    #[serde(default = "default_ca_key")]
    key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
    trust_domain: TrustDomain,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "default_drain_timeout", deserialize_with = "duration")]
    drain_timeout: Duration,
    worker_threads: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGossip {
    #[serde(default = "default_gossip_bind", deserialize_with = "socket_addr")]
    bind: SocketAddr,
    #[serde(default, deserialize_with = "optional_socket_addr")]
    advertise: Option<SocketAddr>,
    #[serde(default)]
    seeds: Vec<String>,
    #[serde(default = "default_keyring")]
    keyring: PathBuf,
    #[serde(default = "default_gossip_interval", deserialize_with = "duration")]
    interval: Duration,
    #[serde(default = "default_dead_grace", deserialize_with = "duration")]
    dead_grace: Duration,
    #[serde(default = "default_max_datagram")]
    max_datagram: usize,
}

impl Default for RawGossip {
    fn default() -> Self {
        RawGossip {
            bind: default_gossip_bind(),
            advertise: None,
            seeds: Vec::new(),
            keyring: default_keyring(),
            interval: default_gossip_interval(),
            dead_grace: default_dead_grace(),
            max_datagram: default_max_datagram(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    #[serde(default = "default_tunnel_bind", deserialize_with = "socket_addr")]
    bind: SocketAddr,
    #[serde(default, deserialize_with = "optional_socket_addr")]
    advertise: Option<SocketAddr>,
}

impl Default for RawTunnel {
    fn default() -> Self {
        RawTunnel {
            bind: default_tunnel_bind(),
            advertise: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_socket")]
    socket: PathBuf,
    #[serde(default = "default_admin_http", deserialize_with = "socket_addr")]
    http: SocketAddr,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            socket: default_admin_socket(),
            http: default_admin_http(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_log_level")]
    level: String,
    #[serde(default = "default_log_format")]
    format: LogFormat,
    #[serde(default = "default_access_log")]
    access_log: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_log_level(),
            format: default_log_format(),
            access_log: default_access_log(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    port: u16,
    #[serde(default = "default_service_address")]
    address: IpAddr,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    #[serde(default = "default_weight")]
    weight: u32,
    check: Option<RawCheck>,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    rps: u32,
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    http: Option<String>,
    tcp: Option<bool>,
    exec: Option<Vec<String>>,
    #[serde(default = "default_check_interval", deserialize_with = "duration")]
    interval: Duration,
    #[serde(default = "default_check_timeout", deserialize_with = "duration")]
    timeout: Duration,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/weft")
}
fn default_gossip_bind() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7401))
}
fn default_tunnel_bind() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7402))
}
fn default_keyring() -> PathBuf {
    PathBuf::from("/etc/weft/gossip.keys")
}
fn default_gossip_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_dead_grace() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_datagram() -> usize {
    weft_discovery::SealConfig::default().max_datagram
}
fn default_trust_bundle() -> PathBuf {
    PathBuf::from("/etc/weft/trust-bundle.pem")
}
fn default_join_token() -> PathBuf {
    PathBuf::from("/etc/weft/join.token")
}
fn default_svid_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_node_svid_ttl() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_ca_cert() -> PathBuf {
    PathBuf::from("/etc/weft/ca/intermediate.pem")
}
fn default_ca_key() -> PathBuf {
    PathBuf::from("/etc/weft/ca/intermediate.key")
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/weft/admin.sock")
}
fn default_admin_http() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 7480))
}
fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_access_log() -> String {
    "off".into()
}
fn default_namespace() -> String {
    "default".into()
}
fn default_service_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
fn default_protocol() -> Protocol {
    Protocol::Tcp
}
fn default_weight() -> u32 {
    1
}
fn default_check_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP:PORT socket address (e.g. \"0.0.0.0:7401\" or \"[::]:7401\")"
        ))
    })
}

fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write e.g. \"500ms\", \"5s\", \"1h\""
        ))
    })
}

// ---- validation ---------------------------------------------------------------------------

/// Node names and service names become SPIFFE path segments and DNS-like labels.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid_chars = name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    });
    if name.is_empty() || name.len() > 63 {
        Err(format!("{what} {name:?} must be 1 to 63 characters"))
    } else if !valid_chars {
        Err(format!(
            "{what} {name:?} may contain only lowercase letters, digits, '-', '_' and '.'"
        ))
    } else if name == "." || name == ".." || name.starts_with('-') {
        Err(format!("{what} {name:?} is not a valid name"))
    } else {
        Ok(())
    }
}

fn advertise_for(
    source: &Source<'_>,
    section: &str,
    bind: SocketAddr,
    advertise: Option<SocketAddr>,
) -> Result<SocketAddr, ConfigError> {
    let advertise = match advertise {
        Some(a) => a,
        None if !bind.ip().is_unspecified() => bind,
        None => {
            return Err(source.error_at(
                KeyPath::parse(&format!("{section}.bind")),
                format!(
                    "{bind} is a wildcard address, so {section}.advertise must say which address peers use"
                ),
            ));
        }
    };
    if advertise.ip().is_unspecified() || advertise.port() == 0 {
        return Err(source.error_at(
            KeyPath::parse(&format!("{section}.advertise")),
            format!("{advertise} cannot be advertised: give a specific IP and a non-zero port"),
        ));
    }
    Ok(advertise)
}

impl RawConfig {
    fn validate(self, path: &Path, source: &Source<'_>) -> Result<Config, ConfigError> {
        let name = match self.node.name {
            Some(name) => name,
            None => gethostname::gethostname()
                .into_string()
                .map_err(|_| {
                    source.error_at(
                        KeyPath::parse("node"),
                        "the hostname is not UTF-8; set node.name",
                    )
                })?
                .to_lowercase(),
        };
        check_name("node name", &name)
            .map_err(|m| source.error_at(KeyPath::parse("node.name"), m))?;
        for label in self.node.labels.keys() {
            check_name("label", label)
                .map_err(|m| source.error_at(KeyPath::parse(&format!("node.labels.{label}")), m))?;
        }
        let worker_threads = match self.node.worker_threads {
            None => DEFAULT_WORKER_THREADS,
            Some(n) if (1..=MAX_WORKER_THREADS).contains(&n) => n,
            Some(n) => {
                return Err(source.error_at(
                    KeyPath::parse("node.worker_threads"),
                    format!("{n} is not between 1 and {MAX_WORKER_THREADS}"),
                ));
            }
        };

        let gossip_advertise =
            advertise_for(source, "gossip", self.gossip.bind, self.gossip.advertise)?;
        for (i, seed) in self.gossip.seeds.iter().enumerate() {
            let valid = seed.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid {
                return Err(source.error_at(
                    KeyPath::parse(&format!("gossip.seeds.{i}")),
                    format!("seed {seed:?} must be HOST:PORT (e.g. \"198.18.0.10:7401\" or \"seed.example.com:7401\")"),
                ));
            }
        }
        if self.gossip.interval < Duration::from_millis(10)
            || self.gossip.interval > Duration::from_secs(60)
        {
            return Err(source.error_at(
                KeyPath::parse("gossip.interval"),
                "must be between 10ms and 60s",
            ));
        }
        if self.gossip.dead_grace < self.gossip.interval * 4 {
            return Err(source.error_at(
                KeyPath::parse("gossip.dead_grace"),
                "must be at least four gossip intervals",
            ));
        }
        if !(1200..=65_507).contains(&self.gossip.max_datagram) {
            return Err(source.error_at(
                KeyPath::parse("gossip.max_datagram"),
                "must be between 1200 and 65507 bytes",
            ));
        }
        let tunnel_advertise =
            advertise_for(source, "tunnel", self.tunnel.bind, self.tunnel.advertise)?;

        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(source.error_at(
                KeyPath::parse("log.level"),
                format!(
                    "{:?} is not a log filter (e.g. \"info\" or \"weft=debug,info\")",
                    self.log.level
                ),
            ));
        }

        let (min_ttl, max_ttl) = (Duration::from_secs(10), Duration::from_secs(30 * 86_400));
        if !(min_ttl..=max_ttl).contains(&self.identity.svid_ttl) {
            return Err(source.error_at(
                KeyPath::parse("identity.svid_ttl"),
                "must be between 10s and 30d",
            ));
        }
        if self.identity.node_svid_ttl < Duration::from_secs(600)
            || self.identity.node_svid_ttl > Duration::from_secs(365 * 86_400)
        {
            return Err(source.error_at(
                KeyPath::parse("identity.node_svid_ttl"),
                "must be between 10m and 365d",
            ));
        }
        let ca = self.ca.filter(|ca| ca.enabled).map(|ca| CaHostConfig {
            cert: ca.cert,
            key: ca.key,
        });

        let mut seen = HashSet::new();
        let mut services = Vec::with_capacity(self.service.len());
        for (i, raw) in self.service.into_iter().enumerate() {
            let at = |field: &str| KeyPath::parse(&format!("service.{i}.{field}"));
            check_name("service name", &raw.name).map_err(|m| source.error_at(at("name"), m))?;
            check_name("namespace", &raw.namespace)
                .map_err(|m| source.error_at(at("namespace"), m))?;
            if raw.port == 0 {
                return Err(source.error_at(at("port"), "must be 1 to 65535"));
            }
            let key = ServiceKey::new(raw.namespace, raw.name);
            if !seen.insert(key.clone()) {
                return Err(source.error_at(at("name"), format!("service {key} is defined twice")));
            }
            let check = raw
                .check
                .map(|c| c.validate(&at("check"), source))
                .transpose()?;
            let rate_limit = match raw.rate_limit {
                None => None,
                Some(limit) => {
                    if raw.protocol == Protocol::Tcp {
                        return Err(source.error_at(
                            at("rate_limit"),
                            "limits HTTP requests; this service's protocol is tcp",
                        ));
                    }
                    if limit.rps == 0 {
                        return Err(source.error_at(at("rate_limit.rps"), "must be at least 1"));
                    }
                    let burst = limit.burst.unwrap_or(limit.rps);
                    if burst == 0 {
                        return Err(source.error_at(at("rate_limit.burst"), "must be at least 1"));
                    }
                    Some(RateLimit {
                        rps: limit.rps,
                        burst,
                    })
                }
            };
            services.push(ServiceConfig {
                key,
                address: SocketAddr::new(raw.address, raw.port),
                protocol: raw.protocol,
                weight: raw.weight,
                check,
                rate_limit,
            });
        }

        let mut listens: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        let mut upstreams = Vec::with_capacity(self.upstream.len());
        for (i, raw) in self.upstream.into_iter().enumerate() {
            let at = |field: &str| KeyPath::parse(&format!("upstream.{i}.{field}"));
            let (namespace, name) = match raw.service.split_once('/') {
                Some((ns, name)) => (ns.to_string(), name.to_string()),
                None => (raw.namespace, raw.service),
            };
            check_name("service name", &name).map_err(|m| source.error_at(at("service"), m))?;
            check_name("namespace", &namespace).map_err(|m| source.error_at(at("namespace"), m))?;
            if raw.listen.port() == 0 {
                return Err(source.error_at(at("listen"), "needs a fixed port"));
            }
            if let Some(first) = listens.insert(raw.listen, i) {
                return Err(source.error_at(
                    at("listen"),
                    format!("{} is already used by upstream[{first}]", raw.listen),
                ));
            }
            let from = match raw.from {
                Some(from) => {
                    let key = match from.split_once('/') {
                        Some((ns, name)) => ServiceKey::new(ns, name),
                        None => ServiceKey::new("default", from),
                    };
                    if !services.iter().any(|s| s.key == key) {
                        return Err(source.error_at(
                            at("from"),
                            format!("{key} is not a [[service]] of this host"),
                        ));
                    }
                    Some(key)
                }
                None => None,
            };
            upstreams.push(UpstreamConfig {
                service: ServiceKey::new(namespace, name),
                listen: raw.listen,
                from,
            });
        }
        let access_log = match self.log.access_log.as_str() {
            "off" | "" => None,
            "stdout" => Some(AccessLogTarget::Stdout),
            path if path.starts_with('/') => Some(AccessLogTarget::File(PathBuf::from(path))),
            other => {
                return Err(source.error_at(
                    KeyPath::parse("log.access_log"),
                    format!("{other:?} is not \"off\", \"stdout\" or an absolute file path"),
                ));
            }
        };
        let http_proxy = match self.outbound.http_proxy.as_str() {
            "off" | "" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|_| {
                source.error_at(
                    KeyPath::parse("outbound.http_proxy"),
                    format!("{text:?} is not an IP:PORT socket address (or \"off\")"),
                )
            })?),
        };
        if let Some(addr) = http_proxy
            && listens.contains_key(&addr)
        {
            return Err(source.error_at(
                KeyPath::parse("outbound.http_proxy"),
                format!("{addr} is also an upstream listener"),
            ));
        }

        Ok(Config {
            path: path.to_path_buf(),
            node: NodeConfig {
                name,
                trust_domain: self.node.trust_domain,
                data_dir: self.node.data_dir,
                labels: self.node.labels,
                drain_timeout: self.node.drain_timeout,
                worker_threads,
            },
            gossip: GossipConfig {
                bind: self.gossip.bind,
                advertise: gossip_advertise,
                seeds: self.gossip.seeds,
                keyring: self.gossip.keyring,
                interval: self.gossip.interval,
                dead_grace: self.gossip.dead_grace,
                max_datagram: self.gossip.max_datagram,
            },
            tunnel: TunnelConfig {
                bind: self.tunnel.bind,
                advertise: tunnel_advertise,
            },
            admin: AdminConfig {
                socket: self.admin.socket,
                http: self.admin.http,
            },
            log: LogConfig {
                level: self.log.level,
                format: self.log.format,
                access_log,
            },
            identity: IdentityConfig {
                trust_bundle: self.identity.trust_bundle,
                join_token: self.identity.join_token,
                svid_ttl: self.identity.svid_ttl,
                node_svid_ttl: self.identity.node_svid_ttl,
            },
            ca,
            services,
            upstreams,
            outbound: OutboundConfig { http_proxy },
            policy: PolicyConfig {
                min_version: self.policy.min_version,
            },
        })
    }
}

impl RawCheck {
    fn validate(self, at: &KeyPath, source: &Source<'_>) -> Result<CheckConfig, ConfigError> {
        let field = |name: &str| {
            let mut path = at.clone();
            path.0.push(source::KeySegment::Key(name.into()));
            path
        };
        let kind = match (self.http, self.tcp, self.exec) {
            (Some(path), None, None) => {
                if !path.starts_with('/') {
                    return Err(source.error_at(
                        field("http"),
                        format!("{path:?} must be a path starting with '/'"),
                    ));
                }
                CheckKind::Http { path }
            }
            (None, Some(true), None) => CheckKind::Tcp,
            (None, Some(false), None) => {
                return Err(source.error_at(
                    field("tcp"),
                    "`tcp = false` is not a check; remove the check instead",
                ));
            }
            (None, None, Some(argv)) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(source.error_at(
                        field("exec"),
                        "needs a program, e.g. [\"/usr/bin/check\", \"arg\"]",
                    ));
                }
                CheckKind::Exec { argv }
            }
            _ => {
                return Err(source.error_at(
                    at.clone(),
                    "a check needs exactly one of `http = \"/path\"`, `tcp = true` or `exec = [\"cmd\", ...]`",
                ));
            }
        };
        if self.timeout.is_zero() || self.interval.is_zero() {
            return Err(source.error_at(
                field("interval"),
                "interval and timeout must be greater than zero",
            ));
        }
        if self.timeout > self.interval {
            return Err(source.error_at(
                field("timeout"),
                "must not be longer than the check interval",
            ));
        }
        Ok(CheckConfig {
            kind,
            interval: self.interval,
            timeout: self.timeout,
        })
    }
}

#[cfg(test)]
mod tests;
