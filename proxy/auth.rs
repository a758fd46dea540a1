//! Bearer-token checks for the admin API's mutating calls. Tokens are compared in constant time
//! (no early exit on the first differing byte, every configured token is compared).

use http::StatusCode;

/// Why a call was refused: status and a reason for the `{"error": …}` body.
pub type Refusal = (StatusCode, &'static str);

/// The token of an accepted `Authorization: Bearer <token>` header.
pub fn check<'a>(tokens: Option<&[String]>, header: Option<&'a str>) -> Result<&'a str, Refusal> {
    let token = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or((
            StatusCode::UNAUTHORIZED,
            "missing or malformed Authorization header (want: Bearer <token>)",
        ))?;
    let Some(tokens) = tokens else {
        return Err((
            StatusCode::FORBIDDEN,
            "no admin.token_file is configured: mutating calls are refused",
        ));
    };
    let mut ok = false;
    for t in tokens {
        ok |= ct_eq(t.as_bytes(), token.as_bytes());
    }
    if ok {
        Ok(token)
    } else {
        Err((StatusCode::FORBIDDEN, "token not accepted"))
    }
}

/// Constant-time equality for equal lengths; lengths are not secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let toks = vec!["s3cret".to_string(), "other".to_string()];
        assert_eq!(check(Some(&toks), Some("Bearer s3cret")), Ok("s3cret"));
        assert_eq!(check(Some(&toks), Some("Bearer other")), Ok("other"));
        assert_eq!(
            check(Some(&toks), Some("Bearer s3cre")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            check(Some(&toks), Some("Basic s3cret")).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(Some(&toks), Some("Bearer ")).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(Some(&toks), None).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(None, Some("Bearer s3cret")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            check(Some(&[]), Some("Bearer s3cret")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
    }
}
