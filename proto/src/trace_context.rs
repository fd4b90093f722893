//! The W3C trace context (`traceparent`, `tracestate`) as Potluck carries it:
//! in every `ForwardRequest` (one long-lived stream serves many requests, so
//! stream-open metadata cannot name the request) and in the metadata of unary
//! calls. Lives here because the coordinator and the worker both speak it.
//!
//! Without an OpenTelemetry layer installed, spans have no trace context: the
//! sender writes empty strings and the receiver ignores them.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The metadata key of the W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of the W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// A span's trace context in W3C text form; empty strings when it has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    /// `00-<trace id>-<parent span id>-<flags>`.
    pub traceparent: String,
    /// Vendor key-value pairs, passed along unchanged.
    pub tracestate: String,
}

impl TraceHeaders {
    /// The context a message sent from inside `span` carries, so the receiver's span becomes its child.
    pub fn of(span: &tracing::Span) -> Self {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return Self::default();
        }
        Self {
            traceparent: format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()),
            tracestate: sc.trace_state().header(),
        }
    }

    /// The trace context of the current span.
    pub fn current() -> Self {
        Self::of(&tracing::Span::current())
    }

    /// Makes `span` a child of the remote span these headers name; malformed or empty headers leave it a root.
    pub fn parent(&self, span: &tracing::Span) {
        if let Some(sc) = self.remote_span() {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
        }
    }

    /// Reads the headers from gRPC metadata (empty when absent or not ASCII).
    pub fn from_metadata(meta: &tonic::metadata::MetadataMap) -> Self {
        let get = |k: &str| meta.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        Self { traceparent: get(TRACEPARENT), tracestate: get(TRACESTATE) }
    }

    /// Writes the headers into gRPC metadata (skipping empty or unencodable ones).
    pub fn inject<T>(&self, request: &mut tonic::Request<T>) {
        for (k, v) in [(TRACEPARENT, &self.traceparent), (TRACESTATE, &self.tracestate)] {
            if let (false, Ok(v)) = (v.is_empty(), v.parse()) {
                request.metadata_mut().insert(k, v);
            }
        }
    }

    /// Parses `traceparent` (version 00 layout; later versions are read the same way, as W3C asks).
    fn remote_span(&self) -> Option<SpanContext> {
        let mut parts = self.traceparent.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = self.tracestate.parse::<TraceState>().unwrap_or_default();
        let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags) & TraceFlags::SAMPLED, true, state);
        sc.is_valid().then_some(sc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> TraceHeaders {
        TraceHeaders { traceparent: traceparent.into(), tracestate: String::new() }
    }

    #[test]
    fn parses_valid_and_rejects_malformed_traceparents() {
        let sc = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").remote_span().expect("valid");
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(headers(bad).remote_span().is_none(), "{bad:?}");
        }
    }

    #[test]
    fn untraced_spans_carry_nothing() {
        assert_eq!(TraceHeaders::current(), TraceHeaders::default());
    }
}
