//! The one error type of the gateway's handlers. Its status comes from the code, through the
//! one table of both (`protocol::codes::http_status`); the ledger's, the license's and the wire
//! format's errors convert into it.

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ledger::LedgerError;
use license::LicenseError;
use protocol::codes;
use service_kit::ApiError;

/// A refusal: a stable code (one of `protocol::codes`, or the wire format's), a message, and
/// for the retryable ones a `Retry-After`.
#[derive(Debug)]
pub struct Error(ApiError);

impl Error {
    /// A refusal with the status of `code` in the table.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(codes::http_status(code))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Error(ApiError::new(status, code, message))
    }

    /// Adds a `Retry-After` header.
    pub fn retry(self, seconds: u64) -> Self {
        Error(self.0.retry(seconds))
    }

    /// A JSON body that does not parse, lacks its content type or has wrong fields: `bad_json`
    /// with axum's status (400, 415 or 422).
    pub fn json(rejection: JsonRejection) -> Self {
        Error(ApiError::new(
            rejection.status(),
            codes::BAD_JSON,
            rejection.body_text(),
        ))
    }

    /// A body that could not be read: 413 past `limit` bytes, else 400.
    pub fn body(rejection: BytesRejection, limit: usize) -> Self {
        Error(ApiError::body(rejection, limit))
    }

    /// An invalid model, layer or key name.
    pub fn name(e: protocol::InvalidName) -> Self {
        Error(ApiError::invalid_name(e))
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Error::new(codes::INTERNAL, "the request failed inside the gateway")
    }
}

impl From<LedgerError> for Error {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::QuotaExceeded {
                quota,
                remaining,
                requested,
            } => Error::new(
                codes::QUOTA_EXCEEDED,
                format!("{requested} tokens requested, {remaining} of {quota} left in this period"),
            ),
            LedgerError::RateLimited { retry_after_s, .. } => Error::new(
                codes::RATE_LIMITED,
                "token rate limit of the license reached",
            )
            .retry(retry_after_s),
            LedgerError::LeaseExpired {
                quota,
                remaining,
                requested,
            } => Error::new(
                codes::LEASE_EXPIRED,
                format!(
                    "the request outlived its reservation's lease and the quota has no room left \
                     for it ({requested} tokens, {remaining} of {quota} left): nothing was billed"
                ),
            ),
            e => {
                tracing::error!(error = %e, "ledger unavailable: refusing the request");
                Error::new(
                    codes::LEDGER_UNAVAILABLE,
                    "usage cannot be recorded now; retry",
                )
                .retry(1)
            }
        }
    }
}

/// A license that does not verify: 401 with the license's own code.
impl From<LicenseError> for Error {
    fn from(e: LicenseError) -> Self {
        Error::new(e.code(), e.to_string())
    }
}

impl From<fhe_linear::WireError> for Error {
    fn from(e: fhe_linear::WireError) -> Self {
        // The wire format's codes are all "the body is not a valid batch": 400.
        Error(ApiError::new(
            StatusCode::BAD_REQUEST,
            e.code(),
            e.to_string(),
        ))
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        e.0
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the gateway answers with has its status in the table (none falls to 500 but
    /// `internal`), the license's codes included.
    #[test]
    fn every_code_has_its_status() {
        let license_codes = [
            LicenseError::Malformed(String::new()),
            LicenseError::UnsupportedAlgorithm(String::new()),
            LicenseError::MissingKeyId,
            LicenseError::UnknownKeyId(String::new()),
            LicenseError::BadSignature,
            LicenseError::WrongAudience,
            LicenseError::Expired,
            LicenseError::NotYetValid,
        ]
        .map(|e| Error::from(e).0.status);
        assert!(license_codes.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
        for code in [
            codes::QUOTA_EXCEEDED,
            codes::RATE_LIMITED,
            codes::LEASE_EXPIRED,
            codes::TOO_MANY_ROWS,
            codes::TOO_MANY_IN_FLIGHT,
            codes::NO_WORKER,
            codes::LEDGER_UNAVAILABLE,
            codes::LICENSE_MISSING,
            codes::LICENSE_REVOKED,
            codes::LICENSE_WRONG_MODEL,
            codes::LAYER_NOT_LICENSED,
            codes::ADMIN_TOKEN_MISSING,
            codes::ADMIN_TOKEN_INVALID,
            codes::ADMIN_TOKEN_EXPIRED,
            codes::ADMIN_TOKEN_REVOKED,
            codes::ADMIN_ROLE_INSUFFICIENT,
            codes::ISSUING_DISABLED,
            codes::INVALID_LICENSE_REQUEST,
            codes::BAD_QUERY,
            codes::EXCEEDS_RATE_LIMIT,
            codes::KEY_REQUIRED,
            codes::UNKNOWN_KEY,
            codes::KEY_NOT_OWNED,
            codes::KEY_PARAMETER_MISMATCH,
            codes::INVALID_KEY,
            codes::TOO_MANY_KEYS,
            codes::LAYER_PARTS_MISMATCH,
            codes::MISSING_QUERY_ID,
            codes::BODY_TOO_LARGE,
        ] {
            assert_ne!(codes::http_status(code), 500, "{code}");
        }
        assert_eq!(codes::http_status(codes::INTERNAL), 500);
    }
}
