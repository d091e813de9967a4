//! The Python that holds the reference checkers the tests use (`standardwebhooks`,
//! `openapi-spec-validator`): `PAYRETRY_TEST_PYTHON` (scripts/test.sh sets it), else the venv
//! scripts/test.sh builds. Missing, it fails the test loudly.

pub fn python() -> String {
    let python = std::env::var("PAYRETRY_TEST_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/payretry-venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "no Python with the reference checkers at {python}: run scripts/test.sh once (it builds \
         the venv), or set PAYRETRY_TEST_PYTHON to a python that has \
         `pip install standardwebhooks openapi-spec-validator`"
    );
    python
}
