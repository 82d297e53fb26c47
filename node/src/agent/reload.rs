//! SIGHUP: re-read the config file, the gossip keyring and the trust bundle; apply what can
//! change live, keep the running values (and say so) for what needs a restart, and keep
//! everything if any of the files is bad.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{error, info, warn};
use weft_ca::TrustBundle;
use weft_discovery::Keyring;

use super::{Agent, service_records};
use crate::config::Config;
use crate::health::{self, HealthChecks};

impl Agent {
    /// Reloads config and keyring; on any error the running config stays in force.
    pub(super) async fn reload(&mut self) {
        let running = self.shared.config.load_full();
        let new = match Config::load(&running.path) {
            Ok(new) => new,
            Err(e) => {
                error!(error = %e, "config reload refused; the running config stays in force");
                self.shared.metrics.config_reload(false);
                return;
            }
        };
        let keyring = match Keyring::load(&new.gossip.keyring) {
            Ok(keyring) => keyring,
            Err(e) => {
                error!(error = %e, "config reload refused: bad gossip keyring; the running config stays in force");
                self.shared.metrics.config_reload(false);
                return;
            }
        };

        let bundle = match TrustBundle::load_pem(
            running.node.trust_domain.clone(),
            &running.identity.trust_bundle,
        ) {
            Ok(bundle) => bundle,
            Err(e) => {
                error!(error = %e, "config reload refused: bad trust bundle; the running config stays in force");
                self.shared.metrics.config_reload(false);
                return;
            }
        };

        let changes = running.reload_changes(&new);
        if !changes.need_restart.is_empty() {
            warn!(sections = ?changes.need_restart, "these settings changed but apply only after a restart; running values kept");
        }
        let mut applied = (*running).clone();
        applied.services = new.services;
        if applied.upstreams != new.upstreams {
            match self.upstreams.set(&new.upstreams).await {
                Ok(()) => applied.upstreams = new.upstreams,
                Err(e) => warn!(error = %e, "upstream listeners unchanged"),
            }
        }
        applied.log = crate::config::LogConfig {
            level: new.log.level,
            format: running.log.format,
            access_log: running.log.access_log.clone(),
        };

        if let (true, Some(log)) = (changes.log_level, &self.log)
            && let Err(e) = log.set_level(&applied.log.level)
        {
            warn!(error = %e, "could not change the log level");
        }

        let keyring_changed = keyring.fingerprints() != self.shared.keyring.load().fingerprints();
        if keyring_changed {
            let fingerprints = keyring.fingerprints();
            self.shared
                .metrics
                .gossip
                .set_keyring_keys(keyring.keys().len());
            self.shared.keyring.store(Arc::new(keyring));
            self.membership
                .set_keyring_fingerprints(&fingerprints)
                .await;
            info!(keyring = ?fingerprints, "gossip keyring changed");
        }

        let bundle_changed = bundle.roots() != self.shared.bundle.load().roots();
        if bundle_changed {
            info!(
                roots = bundle.roots().len(),
                "trust bundle changed; open tunnels are verified again"
            );
            // The revocations in force stay installed; the roots are what changed.
            self.shared
                .bundle
                .rcu(|current| bundle.with_revocations(current.revocations().clone()));
            self.shared.trust_signal.changed();
        }

        if changes.services {
            self.replace_services(&running, &applied).await;
        }
        self.shared.config.store(Arc::new(applied));
        self.shared.metrics.config_reload(true);
        info!(
            services = changes.services,
            log_level = changes.log_level,
            keyring = keyring_changed,
            "config reloaded"
        );
    }

    /// Publishes the new service set, keeping the last health of services whose definition
    /// did not change, and restarts the checks.
    async fn replace_services(&mut self, running: &Config, applied: &Config) {
        let mut next_health = BTreeMap::new();
        for service in &applied.services {
            let unchanged = running.services.iter().any(|old| old == service);
            let health = match self.last_health.get(&service.key) {
                Some(h) if unchanged => *h,
                _ => health::initial_health(service),
            };
            next_health.insert(service.key.clone(), health);
        }
        for old in running
            .services
            .iter()
            .filter(|s| !next_health.contains_key(&s.key))
        {
            self.shared.metrics.forget_service(&old.key);
        }
        self.last_health = next_health;
        self.published_health = self.effective_health();
        self.membership
            .set_services(service_records(&applied.services, &self.published_health))
            .await;
        self.checks = HealthChecks::start(&applied.services, self.results_tx.clone());
        let _ = self
            .services_tx
            .send(applied.services.iter().map(|s| s.key.clone()).collect());
        // Dropping the old checks aborts them. A result they already queued is ignored if its
        // service is gone; for a kept service the next probe supersedes it.
    }
}
