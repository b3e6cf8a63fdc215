//! What a caller may do: their effective role on a project, and the
//! [`Admin`] extractor that guards administrator-only routes.
//!
//! This is the one place that knows administrators act as owners of every
//! project. What each role may do over WebSocket is the op's own metadata
//! (`OpKind::authorize` in `crate::protocol`); what it may do over HTTP is
//! [`require`] at the route. Nothing here reads a token itself: that is
//! `super::auth`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::auth::AuthUser;
use super::error::ApiError;
use crate::protocol::Role;
use crate::storage::{Project, User};

/// The role `user` acts with, given their membership of a project (if
/// any): administrators are owners of every project, whatever their
/// membership says; anyone else has their member role, or none.
pub fn effective_role(user: &User, membership: Option<Role>) -> Option<Role> {
    if user.is_admin {
        Some(Role::Owner)
    } else {
        membership
    }
}

/// The project and the role `user` acts with in it, or the error a caller
/// without access gets: `not_found` for no such project, `forbidden` for a
/// non-member.
pub async fn access(state: &AppState, user: &User, id: i64) -> Result<(Project, Role), ApiError> {
    let project = state
        .store
        .project(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("project {id} does not exist")))?;
    let membership = if user.is_admin {
        None // the role is owner whatever the row says: spare the query
    } else {
        state.store.member_role(id, user.id).await?
    };
    match effective_role(user, membership) {
        Some(role) => Ok((project, role)),
        None => Err(ApiError::forbidden(format!(
            "you are not a member of project {id}; ask one of its owners to add you"
        ))),
    }
}

/// Refuses `role` unless it is at least `needed` for `action`.
pub fn require(role: Role, needed: Role, action: &str) -> Result<(), ApiError> {
    if role >= needed {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{action} needs the {} role; you are {}",
            needed.as_str(),
            role.as_str()
        )))
    }
}

/// An authenticated administrator. Extracting it refuses anyone else
/// (401 without a valid token, 403 for a non-administrator). The first
/// extraction of a request keeps the result in the request's extensions, so
/// a route layer and the handler behind it check the token once.
#[derive(Debug, Clone)]
pub struct Admin(pub AuthUser);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(admin) = parts.extensions.get::<Admin>() {
            return Ok(admin.clone());
        }
        let caller = AuthUser::from_request_parts(parts, state).await?;
        if !caller.user.is_admin {
            return Err(ApiError::forbidden("this needs an administrator"));
        }
        let admin = Admin(caller);
        parts.extensions.insert(admin.clone());
        Ok(admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(is_admin: bool) -> User {
        User {
            id: 1,
            username: "u".into(),
            display_name: "U".into(),
            email: "u@example.com".into(),
            is_admin,
            created_at: 0,
        }
    }

    #[test]
    fn administrators_act_as_owners_whatever_their_membership() {
        for membership in [None, Some(Role::Viewer), Some(Role::Owner)] {
            assert_eq!(effective_role(&user(true), membership), Some(Role::Owner));
            assert_eq!(effective_role(&user(false), membership), membership);
        }
    }
}
