"""The control plane's one write path: every change to users, groups, rules, pools, pods and
sessions goes through these functions, whether it comes from an API endpoint or a policy apply.

Each operation does its database work and tells a `Journal` what agents must learn (typed
change events) and what the admin log must say; the caller commits the journal once, in the
request's transaction. Routers parse and shape responses; they hold no business logic.
"""
