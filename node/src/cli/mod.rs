//! The `weft` command line: argument definitions and dispatch. Each command's work lives in
//! its own module; this one only maps arguments to it and failures to exit codes
//! (0 success, 1 failure, 2 usage errors, which clap reports itself).

mod agent;
mod ca;
mod certs;
mod gossip;
mod policy;
mod read;
mod revoke;
mod stat;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

use weft_ca::RevokedKind;

use crate::config::{Config, DEFAULT_CONFIG_PATH};

/// Weft: a service mesh for VMs and bare-metal hosts.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about, propagate_version = true)]
pub struct Cli {
    /// Agent config file.
    #[arg(short = 'c', long = "config", global = true, env = "WEFT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Admin socket of the local agent (default: `admin.socket` from the config file).
    #[arg(long, global = true, env = "WEFT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output options of read commands.
#[derive(Debug, Clone, Copy, Args)]
pub struct ReadArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Every command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (what the systemd unit starts).
    Agent,
    /// Validate a config file (and the gossip keyring it names) without starting.
    CheckConfig,
    /// Start a self-contained mesh of 3 agents on loopback and show it converge, until Ctrl-C.
    Demo(crate::demo::DemoArgs),
    /// List gossip members: name, addresses, state, age, labels, roles.
    Members(ReadArgs),
    /// Show the service catalog: service, endpoints, health, node.
    Services {
        /// Only this service (`name` or `namespace/name`).
        name: Option<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Show this agent: identity, addresses, peers, keyring, readiness.
    Status(ReadArgs),
    /// Gossip keys: create one, or show the keyrings in use across members.
    Gossip {
        #[command(subcommand)]
        command: GossipCommand,
    },
    /// Offline PKI: create the root of a trust domain, or an intermediate for a CA host.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Identities held on this host (chain, not-after, next renewal), or check any chain.
    Certs {
        #[command(subcommand)]
        command: Option<CertsCommand>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Join tokens for new hosts.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Policies: publish a signed set, show the one in force, or each member's version.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Revocations: cut a host, an identity or one certificate off the whole mesh, or show
    /// the revocations in force.
    Revoke {
        #[command(subcommand)]
        command: RevokeCommand,
    },
    /// Explain the authorization decision for a source, destination and request.
    Why {
        /// Source service (`NAME`, `NAMESPACE/NAME`) or SPIFFE ID.
        #[arg(long)]
        from: String,
        /// Destination service (`NAME` or `NAMESPACE/NAME`).
        #[arg(long)]
        to: String,
        /// Destination port (default: the service's registered port).
        #[arg(long)]
        port: Option<u16>,
        /// HTTP method, for HTTP services.
        #[arg(long, requires = "path")]
        method: Option<String>,
        /// HTTP path, for HTTP services.
        #[arg(long, requires = "method")]
        path: Option<String>,
        /// A request header, `NAME: VALUE`; repeat for several.
        #[arg(long = "header", requires = "method")]
        headers: Vec<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Golden metrics per service across the mesh: success rate, requests per second and
    /// p50/p95/p99 latency of the HTTP requests every agent served over `--interval`.
    Stat {
        /// Only this service (`NAME` or `NAMESPACE/NAME`).
        service: Option<String>,
        /// How long to measure (two samples this far apart), e.g. `5s`, `1m`.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Print a shell completion script.
    Completions {
        /// Shell to generate for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

/// `weft certs …`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Check a PEM certificate chain against a trust bundle and the X.509-SVID profile; print
    /// its SPIFFE ID or the exact reason it fails.
    Verify {
        /// PEM file with the chain, leaf first.
        file: PathBuf,
        /// Trust bundle PEM (default: `identity.trust_bundle` of the config).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Require this SPIFFE ID.
        #[arg(long)]
        id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `weft token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a signed, expiring, single-use join token for one node and the services it may hold.
    Create {
        /// Node name the token is for.
        #[arg(long)]
        node: String,
        /// A service the node may hold (`name` or `namespace/name`); repeat for several.
        #[arg(long = "service")]
        services: Vec<String>,
        /// How long the token may be redeemed (e.g. `30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Directory with operator.pem and operator.key (from `weft ca init`).
        #[arg(long, env = "WEFT_OPERATOR")]
        operator: PathBuf,
    },
}

/// `weft ca …`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create an offline root key and certificate, and an operator credential.
    Init {
        /// Trust domain, e.g. `prod.example.com`.
        #[arg(long)]
        trust_domain: String,
        /// Directory to write root.pem, root.key, bundle.json, operator.pem, operator.key.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Name in the operator's SPIFFE ID (`spiffe://TD/operator/NAME`).
        #[arg(long, default_value = "admin")]
        operator: String,
    },
    /// Create an intermediate (ca.pem, ca.key) for one CA host, signed by the root.
    Intermediate {
        /// Directory holding root.pem and root.key (from `weft ca init`).
        #[arg(long)]
        root: std::path::PathBuf,
        /// The CA host's node name.
        #[arg(long)]
        name: String,
        /// Directory to write ca.pem and ca.key.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// `weft policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy set, sign it with the operator credential and hand it to the local
    /// agent, which spreads it to every member.
    Apply {
        /// A policy file, or a directory of *.yaml / *.yml files; repeat for several.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Directory with operator.pem and operator.key (from `weft ca init`).
        #[arg(long, env = "WEFT_OPERATOR")]
        operator: Option<PathBuf>,
        /// Version to publish (default: seconds since the epoch, or one past the version in
        /// force if that is higher).
        #[arg(long = "policy-version")]
        policy_version: Option<u64>,
        /// Only validate; sign and publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the policy set in force on this agent.
    Get(ReadArgs),
    /// Show each member's policy version, and whether the mesh has converged.
    Status(ReadArgs),
}

/// Who signs a revocation, and why.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Why, shown by `weft revoke list` and in agents' logs.
    #[arg(long)]
    reason: Option<String>,
    /// Directory with operator.pem and operator.key (from `weft ca init`).
    #[arg(long, env = "WEFT_OPERATOR")]
    operator: Option<PathBuf>,
}

/// `weft revoke …`.
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Revoke a host: its node certificates (and CA host certificate) issued up to now. A
    /// host joined again later with a new token is a new identity.
    Node {
        /// The node name.
        name: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Revoke a SPIFFE ID: its certificates issued up to now.
    Id {
        /// The SPIFFE ID, e.g. spiffe://TD/ns/default/sa/api.
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Revoke one certificate (leaf or a CA host's intermediate) by serial number.
    Serial {
        /// The serial, hex (colons allowed), as `weft certs` or `openssl x509 -serial` print it.
        serial: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Show the revocations in force on this agent.
    List(ReadArgs),
}

/// `weft gossip …`.
#[derive(Debug, Subcommand)]
pub enum GossipCommand {
    /// Print a new random gossip key (base64), for a keyring file.
    Keygen,
    /// Show the keyring of this agent and of every live member.
    Keys(ReadArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match &cli.command {
        Command::Agent => agent::run(&cli.config),
        Command::CheckConfig => agent::check_config(&cli.config),
        Command::Demo(args) => crate::demo::run(args),
        Command::Members(read) => read::members(&admin_socket(&cli), *read),
        Command::Services { name, read } => {
            read::services(&admin_socket(&cli), name.as_deref(), *read)
        }
        Command::Status(read) => read::status(&admin_socket(&cli), *read),
        Command::Gossip {
            command: GossipCommand::Keygen,
        } => gossip::keygen(),
        Command::Gossip {
            command: GossipCommand::Keys(read),
        } => gossip::keys(&admin_socket(&cli), *read),
        Command::Ca {
            command:
                CaCommand::Init {
                    trust_domain,
                    out,
                    operator,
                },
        } => ca::init(trust_domain, operator, out),
        Command::Ca {
            command: CaCommand::Intermediate { root, name, out },
        } => ca::intermediate(root, name, out),
        Command::Certs {
            command: None,
            read,
        } => certs::show(&admin_socket(&cli), *read),
        Command::Certs {
            command:
                Some(CertsCommand::Verify {
                    file,
                    bundle,
                    id,
                    json,
                }),
            ..
        } => certs::verify(file, bundle.as_deref(), id.as_deref(), &cli.config, *json),
        Command::Token {
            command:
                TokenCommand::Create {
                    node,
                    services,
                    ttl,
                    operator,
                },
        } => certs::token_create(operator, node, services, ttl),
        Command::Policy {
            command:
                PolicyCommand::Apply {
                    files,
                    operator,
                    policy_version,
                    dry_run,
                },
        } => policy::apply(
            &admin_socket(&cli),
            files,
            operator.as_deref(),
            *policy_version,
            *dry_run,
        ),
        Command::Policy {
            command: PolicyCommand::Get(read),
        } => policy::get(&admin_socket(&cli), *read),
        Command::Policy {
            command: PolicyCommand::Status(read),
        } => policy::status(&admin_socket(&cli), *read),
        Command::Revoke { command } => {
            let socket = admin_socket(&cli);
            let publish = |kind, value: &str, args: &RevokeArgs| {
                revoke::revoke(
                    &socket,
                    kind,
                    value,
                    args.reason.as_deref(),
                    args.operator.as_deref(),
                )
            };
            match command {
                RevokeCommand::List(read) => revoke::list(&socket, *read),
                RevokeCommand::Node { name, args } => publish(RevokedKind::Node, name, args),
                RevokeCommand::Id { id, args } => publish(RevokedKind::Id, id, args),
                RevokeCommand::Serial { serial, args } => {
                    publish(RevokedKind::Serial, serial, args)
                }
            }
        }
        Command::Why {
            from,
            to,
            port,
            method,
            path,
            headers,
            read,
        } => policy::why(
            &admin_socket(&cli),
            &policy::WhyQuestion {
                from,
                to,
                port: *port,
                method: method.as_deref(),
                path: path.as_deref(),
                headers,
            },
            *read,
        ),
        Command::Stat {
            service,
            interval,
            read,
        } => stat::run(
            &admin_socket(&cli),
            service.as_deref(),
            *interval,
            read.json,
        ),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "weft", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The admin socket: `--socket`, else the config file's `admin.socket`, else the default
/// (when the config file cannot be read, as for a user outside the `weft` group).
fn admin_socket(cli: &Cli) -> PathBuf {
    if let Some(socket) = &cli.socket {
        return socket.clone();
    }
    match Config::load(&cli.config) {
        Ok(config) => config.admin.socket,
        Err(_) => Path::new("/run/weft/admin.sock").to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
