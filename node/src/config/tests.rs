use super::*;

const GOOD: &str = r#"
[node]
name = "web-1"
trust_domain = "prod.example.com"
data_dir = "/var/lib/weft"
labels = { zone = "eu-1a" }

[gossip]
bind = "0.0.0.0:7401"
advertise = "198.18.0.11:7401"
seeds = ["198.18.0.10:7401", "seed.example.com:7401"]
keyring = "/etc/weft/gossip.keys"

[tunnel]
bind = "0.0.0.0:7402"
advertise = "198.18.0.11:7402"

[admin]
socket = "/run/weft/admin.sock"
http = "127.0.0.1:7480"

[[service]]
name = "api"
namespace = "default"
port = 8080
protocol = "http"
check = { http = "/healthz", interval = "5s", timeout = "1s" }

[[service]]
name = "db"
port = 5432
check = { tcp = true }
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/weft/weft.toml"), text)
}

fn error(text: &str) -> String {
    parse(text).expect_err("config must be refused").to_string()
}

#[test]
fn the_spec_example_parses_into_typed_values() {
    let config = parse(GOOD).unwrap();
    assert_eq!(config.node.name, "web-1");
    assert_eq!(config.node.trust_domain.as_str(), "prod.example.com");
    assert_eq!(config.gossip.advertise, "198.18.0.11:7401".parse().unwrap());
    assert_eq!(config.gossip.interval, Duration::from_millis(500));
    assert_eq!(config.services.len(), 2);
    let api = &config.services[0];
    assert_eq!(api.key, ServiceKey::new("default", "api"));
    assert_eq!(api.address, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(api.protocol, Protocol::Http);
    assert_eq!(
        api.check,
        Some(CheckConfig {
            kind: CheckKind::Http {
                path: "/healthz".into()
            },
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        })
    );
    assert_eq!(config.services[1].protocol, Protocol::Tcp);
    assert_eq!(
        config.services[1].check.as_ref().unwrap().kind,
        CheckKind::Tcp
    );
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = GOOD.replace(
        "data_dir = \"/var/lib/weft\"",
        "data_dri = \"/var/lib/weft\"",
    );
    let msg = error(&text);
    assert!(
        msg.starts_with("/etc/weft/weft.toml:5: node.data_dri: "),
        "{msg}"
    );
    assert!(msg.contains("unknown field `data_dri`"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn unknown_section_is_refused() {
    let msg = error(&format!("{GOOD}\n[gosip]\nbind = \"0.0.0.0:1\"\n"));
    assert!(msg.contains("unknown field `gosip`"), "{msg}");
    assert!(msg.starts_with("/etc/weft/weft.toml:"), "{msg}");
}

#[test]
fn wrong_type_names_file_line_and_key() {
    let msg = error(&GOOD.replace("port = 8080", "port = \"8080\""));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:25: service[0].port: "),
        "{msg}"
    );
    assert!(msg.contains("invalid type"), "{msg}");
}

#[test]
fn bad_address_names_file_line_and_key() {
    let msg = error(&GOOD.replace(
        "advertise = \"198.18.0.11:7401\"",
        "advertise = \"198.18.0.300:7401\"",
    ));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:10: gossip.advertise: "),
        "{msg}"
    );
    assert!(
        msg.contains("\"198.18.0.300:7401\" is not an IP:PORT socket address"),
        "{msg}"
    );
}

#[test]
fn duplicate_service_names_the_second_definition() {
    let text = format!("{GOOD}\n[[service]]\nname = \"api\"\nport = 9090\n");
    let msg = error(&text);
    assert!(
        msg.starts_with("/etc/weft/weft.toml:35: service[2].name: "),
        "{msg}"
    );
    assert!(
        msg.contains("service default/api is defined twice"),
        "{msg}"
    );
}

#[test]
fn wildcard_bind_without_advertise_is_refused() {
    let msg = error(&GOOD.replace("advertise = \"198.18.0.11:7402\"\n", ""));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:15: tunnel.bind: "),
        "{msg}"
    );
    assert!(msg.contains("tunnel.advertise must say"), "{msg}");
}

#[test]
fn specific_bind_is_advertised_by_default() {
    let text = GOOD
        .replace("bind = \"0.0.0.0:7402\"", "bind = \"198.18.0.11:7402\"")
        .replace("advertise = \"198.18.0.11:7402\"\n", "");
    assert_eq!(
        parse(&text).unwrap().tunnel.advertise,
        "198.18.0.11:7402".parse().unwrap()
    );
}

#[test]
fn bad_trust_domain_is_refused_with_its_key() {
    let msg = error(&GOOD.replace("prod.example.com", "Prod.Example.com"));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:4: node.trust_domain: "),
        "{msg}"
    );
}

#[test]
fn bad_duration_and_bad_check_are_refused() {
    let msg = error(&GOOD.replace("interval = \"5s\"", "interval = \"5 parsecs\""));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:27: service[0].check.interval: "),
        "{msg}"
    );
    assert!(msg.contains("is not a duration"), "{msg}");
    let msg = error(&GOOD.replace(
        "check = { tcp = true }",
        "check = { tcp = true, http = \"/x\" }",
    ));
    assert!(
        msg.contains("service[1].check: a check needs exactly one of"),
        "{msg}"
    );
    let msg = error(&GOOD.replace("timeout = \"1s\"", "timeout = \"10s\""));
    assert!(
        msg.contains("service[0].check.timeout: must not be longer"),
        "{msg}"
    );
}

#[test]
fn worker_threads_default_to_one_and_are_bounded() {
    let config = parse(GOOD).expect("good config");
    assert_eq!(config.node.worker_threads, 1);
    let four = parse(&GOOD.replace("labels = {", "worker_threads = 4\nlabels = {")).expect("4");
    assert_eq!(four.node.worker_threads, 4);
    let msg = error(&GOOD.replace("labels = {", "worker_threads = 0\nlabels = {"));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:6: node.worker_threads: 0 is not between 1 and 64"),
        "{msg}"
    );
}

#[test]
fn bad_names_seeds_and_protocols_are_refused() {
    let msg = error(&GOOD.replace("name = \"api\"", "name = \"API!\""));
    assert!(
        msg.contains("service[0].name: service name \"API!\" may contain only"),
        "{msg}"
    );
    let msg = error(&GOOD.replace("\"seed.example.com:7401\"", "\"seed.example.com\""));
    assert!(
        msg.starts_with("/etc/weft/weft.toml:11: gossip.seeds[1]: "),
        "{msg}"
    );
    let msg = error(&GOOD.replace("protocol = \"http\"", "protocol = \"smtp\""));
    assert!(
        msg.contains("service[0].protocol: unknown variant `smtp`"),
        "{msg}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let msg = error("[node]\nname = \"a\"\ntrust_domain = \n");
    assert!(
        msg.starts_with("/etc/weft/weft.toml:3: invalid TOML: "),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1);
}

#[test]
fn missing_file_is_a_clear_error() {
    let msg = Config::load(Path::new("/nonexistent/weft.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("/nonexistent/weft.toml: cannot read config: "),
        "{msg}"
    );
}

#[test]
fn reload_separates_live_changes_from_restart_changes() {
    let old = parse(GOOD).unwrap();
    let mut new = old.clone();
    new.services.pop();
    new.log.level = "debug".into();
    new.gossip.seeds.clear();
    let changes = old.reload_changes(&new);
    assert!(changes.services && changes.log_level);
    assert_eq!(changes.need_restart, vec!["gossip"]);
    assert_eq!(old.reload_changes(&old), ReloadChanges::default());
}

#[test]
fn policy_min_version_defaults_to_zero_and_needs_a_restart() {
    let old = parse(GOOD).unwrap();
    assert_eq!(old.policy.min_version, 0);
    let new = parse(&format!("{GOOD}\n[policy]\nmin_version = 1796000000\n")).unwrap();
    assert_eq!(new.policy.min_version, 1_796_000_000);
    assert_eq!(old.reload_changes(&new).need_restart, vec!["policy"]);
    let err = error(&format!("{GOOD}\n[policy]\nmin_version = -1\n"));
    assert!(err.contains("policy.min_version"), "{err}");
    let err = error(&format!("{GOOD}\n[policy]\nminimum = 3\n"));
    assert!(err.contains("minimum"), "{err}");
}

#[test]
fn rate_limits_apply_to_http_services_with_burst_defaulting_to_the_rate() {
    let text = format!(
        "{GOOD}\n[[service]]\nname = \"web\"\nport = 8081\nprotocol = \"http\"\nrate_limit = {{ rps = 50 }}\n"
    );
    let config = parse(&text).expect("valid");
    let web = config
        .services
        .iter()
        .find(|s| s.key.name == "web")
        .unwrap();
    assert_eq!(web.rate_limit, Some(RateLimit { rps: 50, burst: 50 }));
    let tcp =
        format!("{GOOD}\n[[service]]\nname = \"q\"\nport = 8082\nrate_limit = {{ rps = 5 }}\n");
    let msg = error(&tcp);
    assert!(msg.contains("service[2].rate_limit: "), "{msg}");
    assert!(msg.contains("this service's protocol is tcp"), "{msg}");
    let zero = format!(
        "{GOOD}\n[[service]]\nname = \"z\"\nport = 8083\nprotocol = \"http\"\nrate_limit = {{ rps = 0 }}\n"
    );
    assert!(error(&zero).contains("service[2].rate_limit.rps: must be at least 1"));
}

#[test]
fn the_access_log_is_off_stdout_or_an_absolute_path() {
    let with = |value: &str| format!("{GOOD}\n[log]\naccess_log = \"{value}\"\n");
    assert_eq!(parse(GOOD).unwrap().log.access_log, None);
    assert_eq!(
        parse(&with("stdout")).unwrap().log.access_log,
        Some(AccessLogTarget::Stdout)
    );
    assert_eq!(
        parse(&with("/var/log/weft/access.log"))
            .unwrap()
            .log
            .access_log,
        Some(AccessLogTarget::File("/var/log/weft/access.log".into()))
    );
    let msg = error(&with("access.log"));
    assert!(msg.contains("log.access_log: "), "{msg}");
    assert!(msg.contains("absolute file path"), "{msg}");
}
