//! The OpenAPI contract: every route the CLI's client calls is an operation of
//! docs/openapi.json, with that method.

use miren_agent::cli::client::Route;
use miren_contract_tests::{openapi_operations, path_fits};

#[test]
fn every_client_route_is_in_the_openapi_document() {
    let operations = openapi_operations();
    for route in Route::ALL {
        assert!(
            operations
                .iter()
                .any(|(m, t)| m == route.method() && t == route.template()),
            "{route:?}: {} {} is not in docs/openapi.json",
            route.method(),
            route.template()
        );
    }
}

#[test]
fn every_openapi_operation_has_a_client_method() {
    for (method, template) in openapi_operations() {
        assert!(
            Route::ALL
                .iter()
                .any(|r| r.method() == method && r.template() == template),
            "{method} {template} has no route in the CLI's client"
        );
    }
}

#[test]
fn paths_built_by_the_client_fit_their_templates() {
    for route in Route::ALL {
        let segments = ["seg-1", "pid:2"];
        let path = route.path(&segments, &[]);
        assert!(path_fits(route.template(), &path), "{route:?}: {path}");
    }
}
