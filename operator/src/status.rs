//! What a resource reports in `status`: `observedGeneration`, the `Accepted`, `ResolvedRefs` and
//! `Ready` conditions with reasons a user can act on, and how many selected sidecars run the
//! current config. Transition times only move when a condition's status changes.

use bulwark_api::{
    Rejection,
    route::SidecarCounts,
    status::{Condition, reasons},
};

/// The conditions of one resource.
pub fn conditions(
    generation: Option<i64>,
    rejection: Option<&Rejection>,
    sidecars: &SidecarCounts,
    previous: &[Condition],
    now: &str,
) -> Vec<Condition> {
    let c = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last = previous
            .iter()
            .find(|p| p.type_ == type_ && p.status == status)
            .and_then(|p| p.last_transition_time.clone())
            .unwrap_or_else(|| now.to_owned());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: Some(last),
        }
    };
    let refs_problem = rejection.filter(|r| {
        [
            reasons::POLICY_NOT_FOUND,
            reasons::BACKEND_NOT_FOUND,
            reasons::ROUTE_NOT_FOUND,
            reasons::SECRET_NOT_FOUND,
            reasons::MODEL_SERVER_NOT_FOUND,
        ]
        .contains(&r.reason)
    });
    // A missing Secret does not keep the route from the sidecars: readiness counts them.
    let excluded = rejection.filter(|r| r.reason != reasons::SECRET_NOT_FOUND);
    let invalid = rejection.filter(|r| r.reason == reasons::INVALID || r.reason == reasons::CONFLICT);
    let accepted = match invalid {
        Some(r) => c("Accepted", false, r.reason, r.message.clone()),
        None => c("Accepted", true, reasons::ACCEPTED, "the resource is valid".into()),
    };
    let resolved = match refs_problem {
        Some(r) => c("ResolvedRefs", false, r.reason, r.message.clone()),
        None => c("ResolvedRefs", true, reasons::RESOLVED_REFS, "every reference resolves".into()),
    };
    let ready = if let Some(r) = excluded {
        c("Ready", false, "NotProgrammed", format!("not programmed into any sidecar: {}", r.message))
    } else if sidecars.total == 0 {
        c("Ready", true, "NoSidecars", "no sidecar selects this resource yet".into())
    } else if sidecars.up_to_date == sidecars.total {
        c("Ready", true, "Programmed", format!("all {} selected sidecars run the current config", sidecars.total))
    } else {
        c(
            "Ready",
            false,
            "Pending",
            format!("{} of {} selected sidecars run the current config", sidecars.up_to_date, sidecars.total),
        )
    };
    vec![accepted, resolved, ready]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(reason: &'static str) -> Rejection {
        Rejection { kind: "LLMRoute", namespace: "a".into(), name: "r".into(), reason, message: "why".into() }
    }

    fn brief(c: &[Condition]) -> Vec<(String, String, String)> {
        c.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect()
    }

    #[test]
    fn each_outcome_has_its_reasons() {
        let all = SidecarCounts { total: 3, up_to_date: 3 };
        let some = SidecarCounts { total: 3, up_to_date: 1 };
        let t = |s: &str| s.to_owned();
        assert_eq!(
            brief(&conditions(Some(2), None, &all, &[], "t0")),
            [
                (t("Accepted"), t("True"), t("Accepted")),
                (t("ResolvedRefs"), t("True"), t("ResolvedRefs")),
                (t("Ready"), t("True"), t("Programmed"))
            ]
        );
        let pending = conditions(Some(2), None, &some, &[], "t0");
        assert_eq!(
            (pending[2].status.as_str(), pending[2].message.as_str()),
            ("False", "1 of 3 selected sidecars run the current config")
        );
        let invalid = conditions(Some(2), Some(&rejection("Invalid")), &all, &[], "t0");
        assert_eq!(brief(&invalid)[0], (t("Accepted"), t("False"), t("Invalid")));
        assert_eq!(invalid[0].message, "why");
        let secret = conditions(Some(2), Some(&rejection("SecretNotFound")), &all, &[], "t0");
        assert_eq!(
            brief(&secret),
            [
                (t("Accepted"), t("True"), t("Accepted")),
                (t("ResolvedRefs"), t("False"), t("SecretNotFound")),
                (t("Ready"), t("True"), t("Programmed"))
            ]
        );
        let refs = conditions(Some(2), Some(&rejection("PolicyNotFound")), &all, &[], "t0");
        assert_eq!(
            brief(&refs)[..2],
            [(t("Accepted"), t("True"), t("Accepted")), (t("ResolvedRefs"), t("False"), t("PolicyNotFound"))]
        );
        assert_eq!(refs[0].observed_generation, Some(2));
    }

    #[test]
    fn transition_times_move_only_on_change() {
        let all = SidecarCounts { total: 1, up_to_date: 1 };
        let first = conditions(Some(1), None, &all, &[], "t0");
        let same = conditions(Some(2), None, &all, &first, "t1");
        assert!(same.iter().all(|c| c.last_transition_time.as_deref() == Some("t0")));
        let changed = conditions(Some(3), Some(&rejection("Invalid")), &all, &same, "t2");
        assert_eq!(changed[0].last_transition_time.as_deref(), Some("t2"));
        assert_eq!(changed[1].last_transition_time.as_deref(), Some("t0"), "ResolvedRefs stayed True");
    }
}
