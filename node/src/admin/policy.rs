//! The policy side of the admin API: offering a signed bundle, showing the one in force,
//! each member's version, and explaining a decision (`weft why`).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{HeaderMap, Uri};
use hyper::{Request, Response, StatusCode};
use weft_ca::SpiffeId;
use weft_discovery::{MemberState, Protocol, ServiceKey};

use super::api::{
    MemberPolicy, PolicyApplied, PolicyFileText, PolicyReport, PolicyStatusReport,
    RevocationReport, WhyReport,
};
use super::server::{json, text_owned};
use crate::agent::Shared;
use crate::agent::signed_store::{Offered, SignedStore, offer_off_runtime};
use crate::policy::bundle::{Content, MAX_BUNDLE_BYTES};
use crate::policy::engine::{HttpRequest, Request as Question};

/// `POST /v1/policy` and `POST /v1/revocations`: offers the signed bundle in the body to
/// `store`; `origin` names the command for logs.
pub async fn offer<C: Content>(
    store: Arc<SignedStore<C>>,
    origin: &str,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(request.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return text_owned(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the bundle: {e}\n"),
            );
        }
    };
    match offer_off_runtime(store, body, format!("the admin socket ({origin})")).await {
        Ok(Offered::Applied { version }) => json(&PolicyApplied {
            result: "applied".into(),
            version,
        }),
        Ok(Offered::AlreadyCurrent { version }) => json(&PolicyApplied {
            result: "current".into(),
            version,
        }),
        Err(e) => text_owned(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
    }
}

/// `GET /v1/policy`.
pub fn report(shared: &Shared) -> PolicyReport {
    let active = shared.policy.active();
    let Some(bundle) = &active.bundle else {
        return PolicyReport {
            state: active.engine.state_name().into(),
            version: 0,
            digest: None,
            operator: None,
            issued_at: None,
            files: Vec::new(),
        };
    };
    PolicyReport {
        state: active.engine.state_name().into(),
        version: bundle.version,
        digest: Some(bundle.digest.clone()),
        operator: Some(bundle.operator.to_string()),
        issued_at: unix(bundle.issued_at),
        files: bundle
            .content
            .files
            .iter()
            .map(|f| PolicyFileText {
                name: f.name.clone(),
                text: f.text.clone(),
            })
            .collect(),
    }
}

fn unix(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// `GET /v1/revocations`.
pub fn revocations(shared: &Shared) -> RevocationReport {
    let held = shared.revocations.held();
    let Some(bundle) = &held.bundle else {
        return RevocationReport {
            version: 0,
            digest: None,
            operator: None,
            issued_at: None,
            revoked: Vec::new(),
        };
    };
    RevocationReport {
        version: bundle.version,
        digest: Some(bundle.digest.clone()),
        operator: Some(bundle.operator.to_string()),
        issued_at: unix(bundle.issued_at),
        revoked: bundle.content.revoked.clone(),
    }
}

/// `GET /v1/policy/status`.
pub fn status(shared: &Shared) -> PolicyStatusReport {
    let active = shared.policy.active();
    let ours = active.advert();
    let catalog = shared.catalog.current();
    let members: Vec<MemberPolicy> = catalog
        .members
        .values()
        .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
        .map(|m| {
            // Our own advert may lag the store by a publish tick; show the truth.
            let advert = if m.is_self {
                ours.clone()
            } else {
                m.policy.clone()
            };
            MemberPolicy {
                node: m.name.clone(),
                state: m.state.as_str().into(),
                version: advert.as_ref().map_or(0, |a| a.version),
                digest: advert.map(|a| a.digest),
            }
        })
        .collect();
    let converged = members.iter().all(|m| {
        m.version == active.version()
            && m.digest.as_deref() == ours.as_ref().map(|a| a.digest.as_str())
    });
    PolicyStatusReport {
        version: active.version(),
        digest: ours.map(|a| a.digest),
        members,
        converged,
    }
}

/// `GET /v1/why?from=..&to=..[&port=..][&method=..&path=..[&header=NAME:VALUE]..]`.
pub fn why(shared: &Shared, uri: &Uri) -> Result<WhyReport, String> {
    let mut from = None;
    let mut to = None;
    let mut port = None;
    let mut method = None;
    let mut path = None;
    let mut headers = HeaderMap::new();
    for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        let value = value.into_owned();
        match key.as_ref() {
            "from" => from = Some(value),
            "to" => to = Some(value),
            "port" => {
                port = Some(
                    value
                        .parse::<u16>()
                        .map_err(|_| format!("port {value:?} is not a port number"))?,
                )
            }
            "method" => method = Some(value),
            "path" => path = Some(value),
            "header" => {
                let (name, value) = value
                    .split_once(':')
                    .ok_or_else(|| format!("header {value:?} is not `NAME: VALUE`"))?;
                let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("{name:?} is not a header name"))?;
                let value = hyper::header::HeaderValue::from_str(value.trim())
                    .map_err(|_| format!("{value:?} is not a header value"))?;
                headers.append(name, value);
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    let config = shared.config.load();
    let trust_domain = &config.node.trust_domain;
    let from = from.ok_or("`from` is required")?;
    let source = if from.starts_with("spiffe://") {
        SpiffeId::parse(&from).map_err(|e| format!("from {from:?}: {e}"))?
    } else {
        let key = service_key(&from)?;
        SpiffeId::service(trust_domain, &key.namespace, &key.name)
            .map_err(|e| format!("from {from:?}: {e}"))?
    };
    let destination = service_key(&to.ok_or("`to` is required")?)?;
    let catalog = shared.catalog.current();
    let endpoint = catalog.endpoints(&destination).first().cloned();
    let port = match (port, &endpoint) {
        (Some(port), _) => port,
        (None, Some(endpoint)) => endpoint.port,
        (None, None) => {
            return Err(format!(
                "{destination} has no endpoint in the catalog; give --port"
            ));
        }
    };
    let active = shared.policy.active();
    let http = match (&method, &path) {
        (Some(method), Some(path)) => Some(HttpRequest {
            method,
            path,
            headers: &headers,
        }),
        (None, None) => None,
        _ => return Err("give both --method and --path, or neither".into()),
    };
    let is_http = endpoint.is_some_and(|e| e.protocol != Protocol::Tcp);
    let decision = if http.is_none() && is_http {
        active.engine.decide_connection(&source, &destination, port)
    } else {
        Some(active.engine.decide(&Question {
            source: &source,
            destination: &destination,
            port,
            http,
        }))
    };
    Ok(WhyReport {
        source: source.to_string(),
        destination: destination.to_string(),
        port,
        decision: match &decision {
            Some(d) if d.allowed => "allow",
            Some(_) => "deny",
            None => "per-request",
        }
        .into(),
        reason: decision.as_ref().map(|d| d.reason.as_str().into()),
        document: decision
            .as_ref()
            .and_then(|d| d.document.as_deref().map(String::from)),
        rule: decision.and_then(|d| d.rule.as_deref().map(String::from)),
        policy_version: active.version(),
    })
}

/// `NAME` (namespace `default`) or `NAMESPACE/NAME`.
fn service_key(text: &str) -> Result<ServiceKey, String> {
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok(ServiceKey::new(namespace, name))
        }
        None if !text.is_empty() => Ok(ServiceKey::new("default", text)),
        _ => Err(format!(
            "{text:?} is not a service (NAME or NAMESPACE/NAME)"
        )),
    }
}
