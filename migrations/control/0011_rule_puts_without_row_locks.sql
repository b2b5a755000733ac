-- Routing serializes the puts of a territory's rule with an advisory lock (which placements share),
-- no longer by locking the rule's latest version row FOR UPDATE: it needs no UPDATE on
-- residency_rules, which is append-only anyway.
REVOKE UPDATE ON residency_rules FROM medgate_routing;
