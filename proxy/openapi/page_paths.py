"""The browser pages in the OpenAPI document: the HTML routes, their forms
(each with its CSRF token) and the pages' own live streams.

Documented although no API client calls them, so that the document lists
every route the app serves (tests/test_openapi.py checks both ways).
"""
from __future__ import annotations

from .builders import (ARRAY_ID, EVENT_STREAM, JOB_ID, REDIRECT, RESUME, STORE_REDIRECT,
                       SUBMIT_FORM, USAGE_PARAMS, USER, USER_PARAM, op, page, page_errors)


def page_paths() -> dict:
    """Login, upload, job and job list pages, account pages, usage and admin pages."""
    return {
        "/": {"get": page("The job upload form")},
        "/login": {
            "get": {**page("The login form"), "security": []},
            "post": {**page("Log in; redirects to ?next= (a local path only); 401 and the form "
                            "again on a wrong name or password", ok="302", errors=[401],
                            form={"username": {"type": "string"},
                                  "password": {"type": "string"}}), "security": []},
        },
        "/logout": {"post": page("Log out", ok="302", form={})},
        "/account/password": {
            "get": page("The password form (forced after a one-time password)"),
            "post": page("Change the password; 400 and the form again on a mistake", ok="302",
                         errors=[400], form={
                "current_password": {"type": "string"}, "new_password": {"type": "string"},
                "confirm_password": {"type": "string"}}),
        },
        "/account/tokens": {
            "get": page("My API tokens"),
            "post": page("Create (label) or revoke (revoke=<token id>) an API token",
                         errors=[404], form={"label": {"type": "string"}, "revoke": {"type": "string"}}),
        },
        "/jobs": {"post": {**page("Submit a job from the upload form; the form again with the "
                                  "error's status when refused", ok="302", form={},
                                  errors=[400, 413, 415, 429]),
                           "requestBody": {"required": True, "content": {
                               "multipart/form-data": {"schema": {
                                   "type": "object", "required": ["csrf_token"], "properties": {
                                       "csrf_token": {"type": "string"},
                                       **SUBMIT_FORM["content"]["multipart/form-data"]
                                       ["schema"]["properties"]}}}}}}},
        "/jobs/{job_id}": {"get": page("One job: state, facts, logs", params=[JOB_ID],
                                       errors=[404])},
        "/jobs/{job_id}/cancel": {"post": page("Cancel a job", ok="302", form={},
                                               params=[JOB_ID], errors=[404])},
        "/jobs/{job_id}/pin": {"post": page("Pin (pinned=1) or unpin (pinned=0) a job",
                                            ok="302", form={"pinned": {"type": "string"}},
                                            params=[JOB_ID], errors=[404])},
        "/jobs/{job_id}/outputs": {"get": {**page("Download the output archive", params=[JOB_ID]),
                                           "responses": {"200": {"description": "zip attachment",
                                                                 "content": {"application/zip": {}}},
                                                         "302": REDIRECT, "307": STORE_REDIRECT,
                                                         **page_errors(404, 410, 503)}}},
        "/arrays/{array_id}": {"get": page("A job array: counts per state, its jobs by index "
                                           "(kept current by polling its JSON)",
                                           params=[ARRAY_ID], errors=[404])},
        "/arrays/{array_id}/cancel": {"post": page("Cancel all of an array's jobs", ok="302",
                                                   form={}, params=[ARRAY_ID], errors=[404])},
        "/arrays/{array_id}/outputs": {"get": {**page("Download all outputs (zip by index)",
                                                      params=[ARRAY_ID]),
                                               "responses": {"200": {"description": "zip attachment",
                                                                     "content": {"application/zip": {}}},
                                                             "302": REDIRECT, **page_errors(404)}}},
        "/job-status/{user}": {"get": op(
            "A user's jobs (HTML, or JSON with Accept: application/json)", USER,
            {"200": {"description": "OK", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobList"}},
                "text/html": {}}},
             "302": REDIRECT, **page_errors(400, 401, 403, 404)},
            params=[{"name": "user", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "before", "in": "query", "description": "a job id: the page after it",
                     "schema": {"type": "string", "maxLength": 64}}])},
        "/jobs/{job_id}/events": {"get": op(
            "The job page's stream (the same as /api/v1/jobs/{job_id}/events)", USER,
            {"200": EVENT_STREAM, **page_errors(400, 401, 403, 404)}, params=[JOB_ID, *RESUME],
            tag="pages")},
        "/job-status/{user}/events": {"get": op(
            "The job list page's stream (the same as /api/v1/users/{user}/events)", USER,
            {"200": EVENT_STREAM, **page_errors(400, 401, 403, 404)}, params=[USER_PARAM, *RESUME],
            tag="pages")},
        "/new": {"get": page("The code editor: templates, CodeMirror, Run posts to /jobs")},
        "/usage": {"get": page("Usage and cost per day or month, with a chart", params=USAGE_PARAMS,
                               errors=[400, 404])},
        "/admin": {"get": page("The admin dashboard", errors=[403])},
        "/account/webhook": {
            "get": page("My webhook signing secret and how notices are signed"),
            "post": page("Replace my webhook signing secret", ok="302", form={}),
        },
    }
