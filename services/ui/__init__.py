"""The admin web page: ``/admin/ui``, a browser face on the admin API.

An operator logs in with an admin token; the page shows plugins, tasks, the live event
stream, logs, alerts, health and nodes, and acts through the same admin API as the CLI.
Everything it shows comes from the API; nothing is rendered as HTML from the log.
"""
