//! What the config file's types cannot express: references between sections, uniqueness, well-formed
//! names, hashes, patterns and ranges. Each error names the field as a user writes it (`users[1].username`).

use crate::file::{AuthMode, Config, ConfigError, Listener, TlsMode, TrustedSenders, invalid};
use std::time::Duration;

/// The largest `limits.max_message_size`.
pub const MAX_MESSAGE_SIZE: usize = 1 << 30;
/// The most of one message a session holds in memory while it arrives: the relay moves a larger message to
/// its spool as it comes (relay `server::inbound`), keeping less than this. `limits.max_inbound_bytes` must
/// leave room for one such session.
pub const BODY_MEMORY_MAX: usize = 1 << 20;

impl Config {
    /// Metrics and admin are separate sockets (one is scraped from the monitoring namespace, the other
    /// deletes mail), and neither may take an SMTP listener's address.
    fn validate_http_endpoints(&self) -> Result<(), ConfigError> {
        let smtp = |address| self.listeners.iter().find(|l| l.address == address);
        if let Some(m) = &self.metrics
            && let Some(l) = smtp(m.address)
        {
            return Err(invalid(
                "metrics.address",
                format!("{} is also the address of listener {:?}", m.address, l.name),
            ));
        }
        if let Some(a) = &self.admin {
            if let Some(l) = smtp(a.address) {
                return Err(invalid(
                    "admin.address",
                    format!("{} is also the address of listener {:?}", a.address, l.name),
                ));
            }
            if self
                .metrics
                .as_ref()
                .is_some_and(|m| m.address == a.address)
            {
                return Err(invalid(
                    "admin.address",
                    format!(
                        "{} is also metrics.address: the queue API needs its own port, so that \
                         whoever may scrape metrics cannot delete mail",
                        a.address
                    ),
                ));
            }
            if a.token_file
                .as_ref()
                .is_some_and(|f| f.as_os_str().is_empty())
            {
                return Err(invalid("admin.token_file", "must not be empty"));
            }
        }
        Ok(())
    }

    /// Checks what the types cannot: references, uniqueness, well-formed names and hashes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_domain_name(&self.hostname) {
            return Err(invalid(
                "hostname",
                format!("{:?} is not a host name", self.hostname),
            ));
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(invalid("spool_dir", "must not be empty"));
        }
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is needed"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            if l.name.is_empty() {
                return Err(invalid(format!("{field}.name"), "must not be empty"));
            }
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("listener name {:?} is used twice", l.name),
                ));
            }
            if let Some(o) = self.listeners[..i].iter().find(|o| o.address == l.address) {
                return Err(invalid(
                    format!("{field}.address"),
                    format!("{} is also the address of listener {:?}", l.address, o.name),
                ));
            }
            if l.tls != TlsMode::None && self.tls.is_none() {
                return Err(invalid(
                    "tls",
                    format!(
                        "listener {:?} uses TLS but there is no tls section with cert_file and key_file",
                        l.name
                    ),
                ));
            }
            if l.auth == AuthMode::Required && l.tls == TlsMode::None {
                return Err(invalid(
                    format!("{field}.auth"),
                    "auth: required needs tls: starttls or implicit (passwords are never sent in clear)",
                ));
            }
            if l.auth == AuthMode::Required && self.users.is_empty() {
                return Err(invalid(
                    "users",
                    format!(
                        "listener {:?} requires auth but no users are configured",
                        l.name
                    ),
                ));
            }
            if let Some(senders) = &l.trusted_senders {
                validate_trusted_senders(l, senders, &field)?;
            }
        }
        self.validate_http_endpoints()?;
        for (i, u) in self.users.iter().enumerate() {
            let field = format!("users[{i}]");
            if u.username.is_empty() {
                return Err(invalid(format!("{field}.username"), "must not be empty"));
            }
            if self.users[..i].iter().any(|o| o.username == u.username) {
                return Err(invalid(
                    format!("{field}.username"),
                    format!("user {:?} is defined twice", u.username),
                ));
            }
            if let Err(e) = crate::password::check_format(&u.password_hash) {
                return Err(invalid(
                    format!("{field}.password_hash"),
                    format!(
                        "not an argon2 PHC string ({e}); make one with `herald-relay hash-password`"
                    ),
                ));
            }
            for (j, d) in u.allowed_domains.iter().enumerate() {
                if !is_domain_name(d) {
                    return Err(invalid(
                        format!("{field}.allowed_domains[{j}]"),
                        format!("{d:?} is not a domain name"),
                    ));
                }
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            let field = format!("domains[{i}]");
            if !is_domain_name(&d.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is not a domain name", d.name),
                ));
            }
            if self.domains[..i]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&d.name))
            {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("domain {:?} is defined twice", d.name),
                ));
            }
            if let Some(rp) = &d.return_path {
                if !is_domain_name(rp) {
                    return Err(invalid(
                        format!("{field}.return_path"),
                        format!("{rp:?} is not a domain name"),
                    ));
                }
                if self.bounces.secret_file.is_none() {
                    return Err(invalid(
                        format!("{field}.return_path"),
                        "needs bounces.secret_file, the key that authenticates return-path tokens",
                    ));
                }
            }
            if let Some(pool) = &d.ip_pool
                && !self.ip_pools.iter().any(|p| &p.name == pool)
            {
                return Err(invalid(
                    format!("{field}.ip_pool"),
                    format!("no ip_pools entry is named {pool:?}"),
                ));
            }
            for (j, dkim) in d.dkim.iter().enumerate() {
                let at = if d.dkim.len() == 1 {
                    format!("{field}.dkim")
                } else {
                    format!("{field}.dkim[{j}]")
                };
                if dkim.selector.is_empty() {
                    return Err(invalid(format!("{at}.selector"), "must not be empty"));
                }
                if d.dkim[..j].iter().any(|o| o.algorithm == dkim.algorithm) {
                    return Err(invalid(
                        format!("{at}.algorithm"),
                        "one key per algorithm: a second signature of the same kind adds nothing",
                    ));
                }
            }
        }
        for (i, p) in self.ip_pools.iter().enumerate() {
            if p.sources.is_empty() {
                return Err(invalid(
                    format!("ip_pools[{i}].sources"),
                    "a pool needs at least one source address",
                ));
            }
            for (j, s) in p.sources.iter().enumerate() {
                if s.weight > crate::file::MAX_SOURCE_WEIGHT {
                    return Err(invalid(
                        format!("ip_pools[{i}].sources[{j}].weight"),
                        format!("at most {}", crate::file::MAX_SOURCE_WEIGHT),
                    ));
                }
                if p.sources[..j].iter().any(|o| o.address == s.address) {
                    return Err(invalid(
                        format!("ip_pools[{i}].sources[{j}].address"),
                        format!("{} is already a source of this pool", s.address),
                    ));
                }
            }
            if p.sources.iter().all(|s| s.weight == 0) {
                return Err(invalid(
                    format!("ip_pools[{i}].sources"),
                    "every weight is 0: at least one source must carry mail",
                ));
            }
            validate_warmup(i, p)?;
        }
        let day = self.shaping.day_length;
        if day < crate::MIN_DAY_LENGTH || day > crate::MAX_DAY_LENGTH || day.subsec_nanos() != 0 {
            return Err(invalid(
                "shaping.day_length",
                "a whole number of seconds from 1s to 7d",
            ));
        }
        validate_shaping(&self.shaping)?;
        let r = &self.delivery.retry;
        if !(r.factor.is_finite() && r.factor >= 1.0) {
            return Err(invalid(
                "delivery.retry.factor",
                "must be a number of at least 1.0",
            ));
        }
        if r.first.is_zero() || r.max < r.first {
            return Err(invalid(
                "delivery.retry",
                "first must be positive and max at least first",
            ));
        }
        let pd = &self.delivery.per_domain;
        if pd.max_connections == 0 || pd.messages_per_connection == 0 {
            return Err(invalid(
                "delivery.per_domain",
                "max_connections and messages_per_connection must be greater than 0",
            ));
        }
        if let Some(sh) = &self.delivery.smarthost {
            // The host is also the name its certificate must be valid for.
            if !(is_domain_name(&sh.host) || sh.host.parse::<std::net::IpAddr>().is_ok()) {
                return Err(invalid(
                    "delivery.smarthost.host",
                    format!("{:?} is not a host name or IP address", sh.host),
                ));
            }
            if sh.username.is_some() != sh.password_file.is_some() {
                return Err(invalid(
                    "delivery.smarthost",
                    "username and password_file go together",
                ));
            }
            if sh.username.is_some() && sh.tls == TlsMode::None {
                return Err(invalid(
                    "delivery.smarthost.tls",
                    "username and password_file need tls: starttls or implicit (credentials are sent only \
                     over TLS to a smarthost whose certificate verified, never in clear)",
                ));
            }
            if let Some(ca) = &sh.ca_file {
                if ca.as_os_str().is_empty() {
                    return Err(invalid("delivery.smarthost.ca_file", "must not be empty"));
                }
                if sh.tls == TlsMode::None {
                    return Err(invalid(
                        "delivery.smarthost.ca_file",
                        "needs tls: starttls or implicit (with tls: none there is no certificate to verify)",
                    ));
                }
            }
        }
        if let Some(dns) = &self.delivery.dns
            && dns.nameservers.is_empty()
        {
            return Err(invalid(
                "delivery.dns.nameservers",
                "list at least one nameserver, or leave out delivery.dns for the system resolver",
            ));
        }
        if let Some(w) = self.events.as_ref().and_then(|e| e.webhook.as_ref()) {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(invalid(
                    "events.webhook.url",
                    "must be an http:// or https:// URL",
                ));
            }
            if w.batch == 0 || w.buffer == 0 {
                return Err(invalid(
                    "events.webhook",
                    "batch and buffer must be greater than 0",
                ));
            }
        }
        self.validate_bounces()?;
        self.suppression.validate()?;
        if let Some(st) = &self.store {
            st.validate()?;
        }
        let lim = &self.limits;
        if lim.max_line_length < 512 {
            return Err(invalid(
                "limits.max_line_length",
                "must be at least 512 (RFC 5321 section 4.5.3.1.4)",
            ));
        }
        for (name, value) in [
            ("limits.max_message_size", lim.max_message_size),
            ("limits.max_recipients", lim.max_recipients),
            ("limits.max_connections", lim.max_connections),
            (
                "limits.max_connections_per_client",
                lim.max_connections_per_client,
            ),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        // A spool record frames its length in 32 bits; headroom is left for the envelope and added headers.
        if lim.max_message_size > MAX_MESSAGE_SIZE {
            return Err(invalid(
                "limits.max_message_size",
                format!("must be at most {MAX_MESSAGE_SIZE} (1 GiB)"),
            ));
        }
        if lim.auth_failures_per_client == 0 {
            return Err(invalid(
                "limits.auth_failures_per_client",
                "must be greater than 0",
            ));
        }
        let one_body = lim.max_message_size.min(BODY_MEMORY_MAX) as u64;
        if let Some(b) = lim.max_inbound_bytes
            && b < one_body
        {
            return Err(invalid(
                "limits.max_inbound_bytes",
                format!(
                    "{b} is less than {one_body}, what one session may hold of a message in memory: no message that large could be received"
                ),
            ));
        }
        if self.delivery.max_connections == Some(0) {
            return Err(invalid(
                "delivery.max_connections",
                "must be greater than 0",
            ));
        }
        if lim.command_timeout.is_zero()
            || lim.data_timeout.is_zero()
            || lim.max_session_duration.is_zero()
        {
            return Err(invalid("limits", "timeouts must be greater than 0"));
        }
        Ok(())
    }

    fn validate_bounces(&self) -> Result<(), ConfigError> {
        for (i, m) in self.bounces.mailboxes.iter().enumerate() {
            if m.is_empty() || m.contains(['@', ' ', '"']) {
                return Err(invalid(
                    format!("bounces.mailboxes[{i}]"),
                    format!("{m:?} is not a local part"),
                ));
            }
        }
        for (i, r) in self.bounces.rules.iter().enumerate() {
            let field = format!("bounces.rules[{i}]");
            if r.status.is_none() && r.code.is_none() && r.text.is_empty() {
                return Err(invalid(
                    field,
                    "give at least one of status, code and text (a rule without conditions matches everything)",
                ));
            }
            if let Some(s) = &r.status
                && crate::bounce::StatusPattern::parse(s).is_none()
            {
                return Err(invalid(
                    format!("{field}.status"),
                    format!(
                        "{s:?} is not an enhanced status code pattern such as 5.1.1, x.7.26 or 4.4"
                    ),
                ));
            }
            if let Some(c) = r.code
                && !(200..600).contains(&c)
            {
                return Err(invalid(
                    format!("{field}.code"),
                    format!("{c} is not an SMTP reply code"),
                ));
            }
            for (j, t) in r.text.iter().enumerate() {
                if let Err(e) = regex::Regex::new(t) {
                    return Err(invalid(format!("{field}.text[{j}]"), e.to_string()));
                }
            }
        }
        Ok(())
    }
}

/// A provider's name: what metrics, events and `GET /shaping` show, so kept to a label-friendly alphabet.
fn is_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn validate_limits(at: &str, l: &crate::ProviderLimits) -> Result<(), ConfigError> {
    if l.max_connections == Some(0) {
        return Err(invalid(
            format!("{at}.max_connections"),
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    if l.messages_per_connection == Some(0) {
        return Err(invalid(
            format!("{at}.messages_per_connection"),
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    if l.max_message_rates.as_ref().is_some_and(Vec::is_empty) {
        return Err(invalid(
            format!("{at}.max_message_rates"),
            "give at least one rate such as 600/min (leave it out for no limit)",
        ));
    }
    Ok(())
}

/// Providers named once, with MX host suffixes that are host names; back-off rules that can match.
fn validate_shaping(s: &crate::Shaping) -> Result<(), ConfigError> {
    validate_limits("shaping.default", &s.default)?;
    for (i, p) in s.providers.iter().enumerate() {
        let at = format!("shaping.providers[{i}]");
        if !is_provider_name(&p.name) {
            return Err(invalid(
                format!("{at}.name"),
                format!(
                    "{:?} is not a provider name: lowercase letters, digits, '-', '_' and '.', at most 63",
                    p.name
                ),
            ));
        }
        if s.providers[..i].iter().any(|o| o.name == p.name) {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} is already listed", p.name),
            ));
        }
        for (j, m) in p.mx.iter().enumerate() {
            if !is_domain_name(m) || m.starts_with('.') || *m != m.to_ascii_lowercase() {
                return Err(invalid(
                    format!("{at}.mx[{j}]"),
                    format!(
                        "{m:?} is not an MX host name suffix such as mx.example.net (lowercase, no wildcard)"
                    ),
                ));
            }
        }
        validate_limits(&at, &p.limits())?;
    }
    for (i, r) in s.rules.iter().enumerate() {
        let at = format!("shaping.rules[{i}]");
        if let Some(p) = &r.provider {
            if !is_provider_name(p) {
                return Err(invalid(
                    format!("{at}.provider"),
                    format!("{p:?} is not a provider name"),
                ));
            }
            // A name with a dot is a registrable domain (the relay checks it against the public suffix list).
            if !p.contains('.')
                && !crate::SHIPPED_PROVIDERS.contains(&p.as_str())
                && !s.providers.iter().any(|o| o.name == *p)
            {
                return Err(invalid(
                    format!("{at}.provider"),
                    format!(
                        "no provider {p:?}; name one of {}, one of shaping.providers, or a registrable domain (example.net)",
                        crate::SHIPPED_PROVIDERS.join(", ")
                    ),
                ));
            }
        }
        if let Some(st) = &r.status
            && crate::bounce::StatusPattern::parse(st).is_none()
        {
            return Err(invalid(
                format!("{at}.status"),
                format!(
                    "{st:?} is not an enhanced status code pattern such as 4.7.28, x.7.28 or 4.7"
                ),
            ));
        }
        match (r.action, r.duration) {
            (crate::BackoffAction::Suspend, None) => {
                return Err(invalid(
                    format!("{at}.duration"),
                    "a suspension needs a duration (1s to 7d)",
                ));
            }
            (crate::BackoffAction::Suspend, Some(d))
                if d < Duration::from_secs(1) || d > crate::MAX_BACKOFF =>
            {
                return Err(invalid(format!("{at}.duration"), "from 1s to 7d"));
            }
            (crate::BackoffAction::Halve | crate::BackoffAction::Bounce, Some(_)) => {
                return Err(invalid(
                    format!("{at}.duration"),
                    format!(
                        "only a suspend rule has a duration, not {}",
                        r.action.as_str()
                    ),
                ));
            }
            _ => {}
        }
    }
    if s.recovery < Duration::from_secs(1) || s.recovery > crate::MAX_BACKOFF {
        return Err(invalid("shaping.recovery", "from 1s to 7d"));
    }
    Ok(())
}

/// A pool's warm-up: one schedule, sensible caps, and a schedule for every address given a start.
fn validate_warmup(i: usize, p: &crate::IpPool) -> Result<(), ConfigError> {
    if let Some(w) = &p.warmup {
        let at = format!("ip_pools[{i}].warmup");
        match (w.preset, w.schedule.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(at, "give a preset or a schedule, not both"));
            }
            (None, true) => {
                return Err(invalid(
                    at,
                    "give a preset (standard) or a schedule of daily caps",
                ));
            }
            _ => {}
        }
        for (k, cap) in w.schedule.iter().enumerate() {
            if *cap == 0 {
                return Err(invalid(
                    format!("{at}.schedule[{k}]"),
                    "a daily cap is at least 1 (an address that must send nothing has weight 0)",
                ));
            }
            if *cap > crate::MAX_DAILY_CAP {
                return Err(invalid(
                    format!("{at}.schedule[{k}]"),
                    format!(
                        "at most {} (leave the day out: past the schedule there is no cap)",
                        crate::MAX_DAILY_CAP
                    ),
                ));
            }
            if k > 0 && *cap < w.schedule[k - 1] {
                return Err(invalid(
                    format!("{at}.schedule[{k}]"),
                    format!(
                        "{cap} is less than the day before ({}): a warm-up schedule never decreases",
                        w.schedule[k - 1]
                    ),
                ));
            }
        }
        if w.schedule.len() > 366 {
            return Err(invalid(format!("{at}.schedule"), "at most 366 days"));
        }
    }
    for (j, s) in p.sources.iter().enumerate() {
        if s.warmup_start.is_some() && p.warmup.is_none() {
            return Err(invalid(
                format!("ip_pools[{i}].sources[{j}].warmup_start"),
                "the pool has no warmup schedule to follow (add ip_pools[].warmup)",
            ));
        }
    }
    Ok(())
}

/// `trusted_senders` only where it decides something: on a listener whose clients relay without AUTH.
fn validate_trusted_senders(
    l: &Listener,
    senders: &TrustedSenders,
    field: &str,
) -> Result<(), ConfigError> {
    let field = format!("{field}.trusted_senders");
    if l.auth == AuthMode::Required {
        return Err(invalid(
            field,
            "a submission listener (auth: required) checks each user's allowed_domains; \
             trusted_senders is for a listener with allow_networks and no auth",
        ));
    }
    if l.allow_networks.is_empty() {
        return Err(invalid(
            field,
            "a listener without allow_networks is inbound and relays nothing; \
             trusted_senders is for a listener with allow_networks and no auth",
        ));
    }
    let TrustedSenders::Domains(domains) = senders else {
        return Ok(());
    };
    if domains.is_empty() {
        return Err(invalid(
            field,
            "an empty list lets no sender through: list domains, write `any`, or leave it out for the \
             relay's sending domains",
        ));
    }
    for (j, d) in domains.iter().enumerate() {
        if d == "any" {
            return Err(invalid(
                format!("{field}[{j}]"),
                "for every sender write `trusted_senders: any`, not a list",
            ));
        }
        if !is_domain_name(d) {
            return Err(invalid(
                format!("{field}[{j}]"),
                format!("{d:?} is not a domain name"),
            ));
        }
    }
    Ok(())
}

/// A host or domain name in the LDH syntax (RFC 1035, with RFC 1123's leading digits), or an A-label.
pub fn is_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use crate::{Config, TrustedSenders};

    /// A config whose second listener is `listener` (YAML flow mapping contents).
    fn with_listener(listener: &str) -> Result<Config, String> {
        Config::parse(&format!(
            "hostname: a\nspool_dir: s\ntls: {{cert_file: c, key_file: k}}\n\
             users: [{{username: u, password_hash: \"{hash}\"}}]\n\
             listeners:\n - {{name: x, address: \"127.0.0.1:1\"}}\n - {{name: y, address: \"127.0.0.1:2\", {listener}}}\n",
            hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$5gqTt8S6NUXAwTCq+3eE1QKqPzB3P7vQ5ny1dB1Hd5w",
        ))
        .map_err(|e| e.to_string())
    }

    const TRUSTED: &str = "allow_networks: [10.0.0.0/8]";

    #[test]
    fn a_message_size_limit_beyond_what_the_spool_frames_is_refused() {
        let parse = |size: usize| {
            Config::parse(&format!(
                "hostname: a\nspool_dir: s\nlisteners: [{{name: a, address: \"127.0.0.1:1\"}}]\n\
                 limits: {{max_message_size: {size}}}\n"
            ))
            .map_err(|e| e.to_string())
        };
        assert!(parse(super::MAX_MESSAGE_SIZE).is_ok());
        let e = parse(super::MAX_MESSAGE_SIZE + 1).unwrap_err();
        assert!(
            e.contains("limits.max_message_size") && e.contains("at most 1073741824"),
            "{e}"
        );
    }

    #[test]
    fn trusted_senders_is_any_or_a_list_of_domains() {
        let c = with_listener(&format!("{TRUSTED}, trusted_senders: any")).unwrap();
        assert_eq!(c.listeners[1].trusted_senders, Some(TrustedSenders::Any));
        let c = with_listener(&format!("{TRUSTED}, trusted_senders: [a.test, B.Test]")).unwrap();
        assert_eq!(
            c.listeners[1].trusted_senders,
            Some(TrustedSenders::Domains(vec![
                "a.test".into(),
                "B.Test".into()
            ]))
        );
        assert_eq!(
            with_listener(TRUSTED).unwrap().listeners[1].trusted_senders,
            None
        );
        // Written back as it was read.
        for form in ["any", "[a.test]"] {
            let c = with_listener(&format!("{TRUSTED}, trusted_senders: {form}")).unwrap();
            let text = serde_saphyr::to_string(&c).unwrap();
            assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        }
    }

    #[test]
    fn a_bad_trusted_senders_names_the_field() {
        let cases = [
            (
                "trusted_senders: anyone",
                "listeners[1].trusted_senders: ",
                "neither `any` nor a list",
            ),
            (
                "trusted_senders: a.test",
                "listeners[1].trusted_senders: ",
                "write [a.test]",
            ),
            (
                "trusted_senders: [a.test, \"bad domain\"]",
                "listeners[1].trusted_senders[1]: ",
                "not a domain name",
            ),
            (
                "trusted_senders: [a.test, any]",
                "listeners[1].trusted_senders[1]: ",
                "trusted_senders: any",
            ),
            (
                "trusted_senders: []",
                "listeners[1].trusted_senders: ",
                "empty list",
            ),
        ];
        for (senders, field, message) in cases {
            let e = with_listener(&format!("{TRUSTED}, {senders}")).unwrap_err();
            assert!(
                e.starts_with(field) && e.contains(message),
                "{senders}: {e}"
            );
        }
    }

    #[test]
    fn trusted_senders_is_refused_where_nobody_relays_without_auth() {
        let e = with_listener(
            "tls: starttls, auth: required, allow_networks: [10.0.0.0/8], trusted_senders: any",
        )
        .unwrap_err();
        assert!(
            e.starts_with("listeners[1].trusted_senders: a submission listener"),
            "{e}"
        );
        let e = with_listener("trusted_senders: [a.test]").unwrap_err();
        assert!(
            e.starts_with(
                "listeners[1].trusted_senders: a listener without allow_networks is inbound"
            ),
            "{e}"
        );
    }
}
