"""`genworker dashboard`: an operator's web view of the queue (see README "Dashboard").

``app`` assembles it, ``views`` has the pages and actions, ``filters`` parses the jobs
page's query, ``security`` the login, sessions and CSRF; templates/ and static/ hold the
HTML and the little JavaScript that keeps the live view moving.
"""
