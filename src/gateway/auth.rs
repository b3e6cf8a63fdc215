//! Who is calling: password hashing, login tokens and the [`AuthUser`]
//! extractor that every authenticated handler takes.
//!
//! Passwords are hashed with argon2id by `super::hashing` (a bounded pool:
//! hashing is CPU- and memory-heavy); tokens are 32 random bytes, shown to
//! the client once and stored only as their SHA-256. Nothing here may log a
//! password or a token.

use axum::extract::{FromRequestParts, Query};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;
use super::hashing::PasswordHashing;
use crate::storage::{NewUser, Store, User};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub user: User,
    /// The SHA-256 of the caller's token, for logout.
    pub token_hash: String,
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers, &parts.uri, TokenFrom::Header)?;
        authenticate(state, &token).await
    }
}

/// The user a token belongs to, or `unauthorized` saying why not.
pub async fn authenticate(state: &AppState, token: &str) -> Result<AuthUser, ApiError> {
    let token_hash = hash_token(token);
    let session = state
        .store
        .auth_session(&token_hash)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("the token is not valid (revoked or never issued); log in again")
        })?;
    if session.expired {
        return Err(ApiError::unauthorized(
            "the token has expired; log in again with POST /api/auth/login",
        ));
    }
    Ok(AuthUser {
        user: session.user,
        token_hash,
    })
}

/// Where a route reads the caller's token from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFrom {
    /// `Authorization: Bearer <token>` only: the JSON API.
    Header,
    /// The header, else the `access_token` query parameter: the WebSocket
    /// routes, because browsers cannot set headers on a WebSocket.
    HeaderOrQuery,
}

/// The caller's token, from `Authorization: Bearer <token>` or (where
/// `from` allows it) the `access_token` query parameter. The header wins
/// when both are present, so a malformed header is refused even with a
/// good query token. An empty token is no token: it is never looked up.
pub fn bearer_token(headers: &HeaderMap, uri: &Uri, from: TokenFrom) -> Result<String, ApiError> {
    let missing = || {
        ApiError::unauthorized(match from {
            TokenFrom::Header => {
                "missing credentials: send `Authorization: Bearer <token>` with a token from POST /api/auth/login"
            }
            TokenFrom::HeaderOrQuery => {
                "missing credentials: send `Authorization: Bearer <token>` or the access_token query parameter"
            }
        })
    };
    let token = match headers.get(AUTHORIZATION) {
        Some(header) => {
            let value = header.to_str().map_err(|_| {
                ApiError::unauthorized("the Authorization header is not valid text")
            })?;
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(|| {
                    ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
                })?
                .trim()
                .to_string()
        }
        None if from == TokenFrom::HeaderOrQuery => query_token(uri).unwrap_or_default(),
        None => String::new(),
    };
    if token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

/// The `access_token` query parameter, if the query has one. A malformed
/// query has none here; the route that reads the query reports it.
fn query_token(uri: &Uri) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct TokenQuery {
        access_token: Option<String>,
    }
    Query::<TokenQuery>::try_from_uri(uri)
        .ok()
        .and_then(|Query(q)| q.access_token)
}

/// A new random login token (64 hex characters).
pub fn generate_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal("generating a token", e))?;
    Ok(hex::encode(bytes))
}

/// How a token is stored: its SHA-256, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random password: 20 characters from an alphabet without look-alikes.
pub fn generate_password() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes)?;
    // 256 is not a multiple of the alphabet's size; the bias this leaves
    // (under 1 bit over the whole password) is irrelevant at 20 characters.
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

/// A user to create through any door (CLI, first start, admin API).
#[derive(Debug, Clone, Default)]
pub struct UserSpec {
    pub username: String,
    /// `None`: generate one and return it.
    pub password: Option<String>,
    pub display_name: Option<String>,
    pub email: Option<String>,
    pub admin: bool,
}

/// Validates and creates a user; returns it and the generated password, if
/// one was generated. The email defaults to `USERNAME@branchd.invalid`, the
/// display name to the username (both are used as git commit author).
pub async fn create_user(
    store: &dyn Store,
    hashing: &PasswordHashing,
    spec: UserSpec,
) -> Result<(User, Option<String>), ApiError> {
    validate_username(&spec.username)?;
    let (password, generated) = match spec.password {
        Some(password) => {
            validate_password(&password)?;
            (password, false)
        }
        None => (
            generate_password().map_err(|e| ApiError::internal("generating a password", e))?,
            true,
        ),
    };
    let display_name = spec
        .display_name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| spec.username.clone());
    let email = spec
        .email
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| format!("{}@branchd.invalid", spec.username));
    if display_name.chars().count() > 200
        || display_name
            .chars()
            .any(|c| c.is_control() || c == '<' || c == '>')
    {
        return Err(ApiError::bad_request(
            "display_name must be at most 200 characters, with no control characters, '<' or '>' (it is the git author name)",
        ));
    }
    if email.len() > 254
        || !email.contains('@')
        || email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
    {
        return Err(ApiError::bad_request(format!(
            "email {email:?} is not an email address"
        )));
    }
    let password_hash = hashing.hash(password.clone()).await?;
    let user = store
        .create_user(NewUser {
            username: spec.username,
            display_name,
            email,
            password_hash,
            is_admin: spec.admin,
        })
        .await?;
    Ok((user, generated.then_some(password)))
}

/// Checks a username: 1 to 64 characters of letters, digits, `.`, `_` and
/// `-`, starting with a letter or digit.
pub fn validate_username(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "username {name:?} is not allowed: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Checks a chosen password: at least 8 characters and at most 1024 bytes.
pub fn validate_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 {
        return Err(ApiError::bad_request(
            "password is too short: use at least 8 characters",
        ));
    }
    if password.len() > 1024 {
        return Err(ApiError::bad_request(
            "password is too long: use at most 1024 bytes",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let a = generate_token().expect("token");
        let b = generate_token().expect("token");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_ne!(hash_token(&a), a);
        assert_eq!(hash_token(&a), hash_token(&a));
    }

    #[test]
    fn usernames_are_checked() {
        assert!(validate_username("ada.lovelace-1").is_ok());
        assert!(validate_username("").is_err());
        assert!(validate_username("-dash").is_err());
        assert!(validate_username("with space").is_err());
        assert!(validate_username(&"x".repeat(65)).is_err());
    }

    #[test]
    fn generated_passwords_are_long_and_pass_validation() {
        let password = generate_password().expect("password");
        assert_eq!(password.len(), 20);
        assert!(validate_password(&password).is_ok());
    }
}
