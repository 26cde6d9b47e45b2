//! The OpenAPI document of the gateway, generated from the handlers' annotations and the
//! `protocol` types. `services/gateway/openapi.json` is its checked-in copy (a test keeps the
//! two equal; `hybrid-gateway --print-openapi` prints it).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{admin, keys, keysets, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hybrid-fhe gateway",
        description = "Licensed, metered access to protected layers applied to TFHE-encrypted activations, \
                       plus usage reports and license administration. Errors are `ErrorBody` JSON with a \
                       stable `code` (also in the `x-error-code` header)."
    ),
    paths(
        routes::apply,
        routes::layers,
        keys::put_key,
        keys::list_keys,
        keys::delete_key,
        routes::healthz,
        routes::readyz,
        keysets::jwks,
        admin::customer_usage,
        admin::usage_report,
        admin::usage_export,
        admin::list_licenses,
        admin::issue_license,
        admin::revoke_license,
        admin::audit_log,
    ),
    modifiers(&Security),
    tags(
        (name = "inference", description = "Encrypted layer applications (license token)"),
        (name = "usage", description = "A customer's own usage (license token)"),
        (name = "admin", description = "Reports, exports, licenses, audit (admin token: compliance or admin role)"),
        (name = "health", description = "Probes"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "license",
                "A customer license: EdDSA JWT issued by the vendor",
            ),
            (
                "admin_token",
                "A role-scoped admin token: EdDSA JWT with `role` compliance or admin",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The OpenAPI document, pretty-printed JSON.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}
