//! Metric names. Envoy has no labels on wasm metrics, so labels travel in the name as
//! `;label=value` pairs, which the bootstrap's `stats_config.stats_tags` turn back into
//! Prometheus labels (see envoy/envoy.template.yaml). `;` never occurs in a value: node names
//! are restricted by the configuration, and only configured model ids become label values.

use crate::logic::config::Config;

/// The label value for a requested model: a configured id, or `other` (so that clients cannot
/// create unbounded series).
pub fn model_label<'a>(cfg: &'a Config, model: Option<&str>) -> &'a str {
    match model {
        None => "none",
        Some(m) => cfg.model_name(crate::logic::state::model_key(m)).unwrap_or("other"),
    }
}

/// `2xx`, `4xx`, `5xx`, ... (`none` when there was no response).
pub fn status_class(status: u32) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// `base;k1=v1;k2=v2`, with any `;` in a value replaced (defence in depth).
pub fn name(base: &str, labels: &[(&str, &str)]) -> String {
    let mut out = base.to_string();
    for (k, v) in labels {
        out.push(';');
        out.push_str(k);
        out.push('=');
        out.extend(v.chars().map(|c| if c == ';' || c.is_whitespace() { '_' } else { c }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let cfg =
            Config::parse(br#"{"nodes":[{"name":"rk1","address":"10.0.0.1:1","models":["qwen2.5-1.5b"]}]}"#).unwrap();
        assert_eq!(model_label(&cfg, Some("qwen2.5-1.5b")), "qwen2.5-1.5b");
        assert_eq!(model_label(&cfg, Some("made-up;model")), "other");
        assert_eq!(model_label(&cfg, None), "none");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(0), "none");
        assert_eq!(
            name("exo_lb_requests_total", &[("node", "rk1"), ("model", "qwen2.5-1.5b"), ("status", "2xx")]),
            "exo_lb_requests_total;node=rk1;model=qwen2.5-1.5b;status=2xx"
        );
        assert_eq!(name("x", &[("k", "a;b c")]), "x;k=a_b_c");
    }
}
