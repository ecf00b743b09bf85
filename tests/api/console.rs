//! The admin console over HTTP on both backends: sign-in, every page and action, CSRF, escaping,
//! sessions (expiry, other roles, tenants), the dashboard's numbers, the Stripe log.

use std::collections::BTreeMap;
use std::time::Duration;

use tally::pb;

use crate::support::{Backend, TestApp, TestCaller, callers};

const ADMIN: &str = "console-admin-token-for-tests";
const GENERATION: &str = "console-generation-token-for-tests";
const TENANT: &str = "console-tenant-admin-token-for-tests";

/// A browser of sorts: follows nothing, keeps cookies.
struct Browser {
    base: String,
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

/// A response as the tests read it.
struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the first `name="<field>" value="…"` in the page.
    fn field(&self, name: &str) -> String {
        let needle = format!("name=\"{name}\" value=\"");
        let at = self
            .body
            .find(&needle)
            .unwrap_or_else(|| panic!("no field {name} in {}", self.body));
        let rest = &self.body[at + needle.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    /// The text of the element with `id`.
    fn text_of(&self, id: &str) -> String {
        let needle = format!("id=\"{id}\">");
        let at = self
            .body
            .find(&needle)
            .unwrap_or_else(|| panic!("no #{id} in {}", self.body));
        let rest = &self.body[at + needle.len()..];
        rest[..rest.find('<').unwrap()].to_owned()
    }

    fn assert_secure_headers(&self) {
        let csp = self
            .headers
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no CSP (status {}): {}", self.status, self.body));
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(self.headers["x-frame-options"], "DENY");
        assert_eq!(self.headers["x-content-type-options"], "nosniff");
    }
}

fn num(text: &str) -> i64 {
    text.replace([',', ' '], "")
        .replace('−', "-")
        .parse()
        .unwrap()
}

impl Browser {
    fn new(app: &TestApp) -> Self {
        Self {
            base: format!("http://{}", app.http),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn read(&mut self, resp: reqwest::Response) -> Page {
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let (kv, attrs) = c.split_once(';').unwrap_or((c, ""));
            let (k, v) = kv.split_once('=').unwrap();
            if v.is_empty() || attrs.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        Page {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.read(resp).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", tally::http::admin::enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        self.read(resp).await
    }

    async fn sign_in(&mut self, token: &str) -> Page {
        let form = self.get("/admin/login").await;
        assert_eq!(form.status, 200, "{}", form.body);
        form.assert_secure_headers();
        let csrf = form.field("csrf");
        self.post("/admin/login", &[("token", token), ("csrf", &csrf)])
            .await
    }

    /// Submits an action form of the account page: review, then confirm. Returns the
    /// confirmation page and the answer to the confirmation.
    async fn act(&mut self, account: &str, action: &str, fields: &[(&str, &str)]) -> (Page, Page) {
        let page = self.get(&format!("/admin/accounts/{account}")).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let csrf = page.field("csrf");
        let key = format!("console-{}", uuid::Uuid::new_v4().simple());
        let mut form: Vec<(&str, &str)> = vec![("csrf", &csrf), ("key", &key), ("step", "review")];
        form.extend_from_slice(fields);
        let path = format!("/admin/accounts/{account}/actions/{action}");
        let review = self.post(&path, &form).await;
        if review.status != 200 {
            return (
                review,
                Page {
                    status: 0,
                    headers: reqwest::header::HeaderMap::new(),
                    body: String::new(),
                },
            );
        }
        review.assert_secure_headers();
        assert!(review.body.contains("Confirm"), "{}", review.body);
        form[2] = ("step", "confirm");
        let done = self.post(&path, &form).await;
        (review, done)
    }
}

async fn console_app(backend: Backend, ttl: Duration) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.auth = callers(
            &[
                TestCaller {
                    name: "support",
                    roles: &["admin"],
                    prefixes: &[],
                    token: ADMIN,
                    extra: "",
                },
                TestCaller {
                    name: "jobs",
                    roles: &["generation"],
                    prefixes: &[],
                    token: GENERATION,
                    extra: "",
                },
                TestCaller {
                    name: "tenant",
                    roles: &["admin"],
                    prefixes: &["t-"],
                    token: TENANT,
                    extra: "",
                },
            ],
            crate::support::UNLIMITED,
        );
        // Accounts under 100 credits on the free plan are low.
        let mut catalog = crate::support::catalog_without_allowances();
        catalog.plans.get_mut("free").unwrap().low_balance_threshold = 100;
        s.catalog = std::sync::Arc::new(catalog);
        s.admin = Some(tally::app::AdminSettings {
            session_key: tally::http::admin::SessionKey::from_secret(&"k".repeat(40)).unwrap(),
            session_ttl: ttl,
        });
    })
    .await
}

fn with_token<T>(m: T) -> tonic::Request<T> {
    crate::with(m, ADMIN)
}

async fn balance(app: &TestApp, account: &str) -> pb::CheckBalanceResponse {
    app.credit()
        .await
        .check_balance(crate::with(
            pb::CheckBalanceRequest {
                account_id: account.into(),
            },
            GENERATION,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn entry_count(app: &TestApp, account: &str) -> usize {
    app.admin()
        .await
        .list_entries(with_token(pb::ListEntriesRequest {
            account_id: account.into(),
            page_size: 1000,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries
        .len()
}

async fn grant(app: &TestApp, account: &str, amount: i64) {
    app.admin()
        .await
        .grant(with_token(crate::grant_req(account, amount, &crate::key())))
        .await
        .unwrap();
}

async fn reserve(app: &TestApp, account: &str, amount: i64) -> String {
    app.credit()
        .await
        .reserve(crate::with(
            crate::reserve_req(account, amount, &crate::key()),
            GENERATION,
        ))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap()
        .hold_id
}

/// Sign-in with each kind of token; every page; every action once, with its confirmation,
/// double submission, a missing CSRF token, and markup in what an operator types.
async fn pages_and_actions(backend: Backend) {
    let app = console_app(backend, Duration::from_hours(1)).await;
    let mut b = Browser::new(&app);

    // The vendored script and stylesheet, same policy, no session needed.
    for (path, kind) in [
        ("/admin/assets/console.js", "text/javascript"),
        ("/admin/assets/console.css", "text/css"),
    ] {
        let p = b.get(path).await;
        assert_eq!(p.status, 200, "{path}");
        assert!(
            p.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        p.assert_secure_headers();
    }

    // Signed out: every page sends to the sign-in form; a bad token, a generation token and a
    // form without its CSRF token do not sign in.
    let p = b.get("/admin/accounts").await;
    assert_eq!((p.status, p.location()), (303, "/admin/login"));
    p.assert_secure_headers();
    let p = b.sign_in("not-a-token").await;
    assert_eq!(p.status, 401, "{}", p.body);
    assert!(!b.cookies.contains_key("tally_admin"));
    let p = b.sign_in(GENERATION).await;
    assert_eq!(p.status, 401, "{}", p.body);
    assert!(p.body.contains("lacks the admin role"), "{}", p.body);
    assert!(!b.cookies.contains_key("tally_admin"));
    b.get("/admin/login").await;
    let p = b.post("/admin/login", &[("token", ADMIN)]).await;
    assert_eq!(p.status, 403, "{}", p.body);
    assert!(!b.cookies.contains_key("tally_admin"));
    let p = b.sign_in(ADMIN).await;
    assert_eq!(
        (p.status, p.location()),
        (303, "/admin/accounts"),
        "{}",
        p.body
    );
    let set = p.headers["set-cookie"].to_str().unwrap();
    assert!(set.starts_with("tally_admin="), "{set}");
    for attr in ["HttpOnly", "SameSite=Strict", "Max-Age=3600", "Path=/admin"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    assert!(!set.contains(ADMIN), "{set}");

    // Data: two accounts, an open hold, a committed hold.
    grant(&app, "u-alpha", 1_000).await;
    grant(&app, "u-beta", 10).await;
    grant(&app, "other", 5).await;
    let open = reserve(&app, "u-alpha", 100).await;
    let done = reserve(&app, "u-alpha", 200).await;
    app.credit()
        .await
        .commit(crate::with(
            pb::CommitRequest {
                hold_id: done.clone(),
                amount: 150,
                idempotency_key: crate::key(),
            },
            GENERATION,
        ))
        .await
        .unwrap();

    // Accounts: prefix search, plan and low-balance filters, escaping of the search box.
    let p = b.get("/admin/accounts?q=u-").await;
    assert_eq!(p.status, 200);
    p.assert_secure_headers();
    assert!(
        p.body.contains("/admin/accounts/u-alpha") && p.body.contains("/admin/accounts/u-beta"),
        "{}",
        p.body
    );
    assert!(!p.body.contains("/admin/accounts/other"), "{}", p.body);
    let p = b.get("/admin/accounts?q=u-b").await;
    assert!(
        p.body.contains("u-beta") && !p.body.contains("u-alpha"),
        "{}",
        p.body
    );
    let p = b.get("/admin/accounts?plan=pro").await;
    assert!(!p.body.contains("u-alpha"), "{}", p.body);
    let p = b.get("/admin/accounts?low=1").await;
    assert!(
        p.body.contains("u-beta")
            && p.body.contains("other")
            && !p.body.contains("/admin/accounts/u-alpha\""),
        "{}",
        p.body
    );
    let p = b
        .get("/admin/accounts?q=%3Cscript%3Ealert(1)%3C/script%3E")
        .await;
    assert_eq!(p.status, 200);
    assert!(!p.body.contains("<script>alert"), "{}", p.body);
    assert!(p.body.contains("&lt;script&gt;"), "{}", p.body);

    // An account id with markup is refused, inertly.
    let p = b
        .get("/admin/accounts/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
        .await;
    assert_eq!(p.status, 400, "{}", p.body);
    p.assert_secure_headers();
    assert!(!p.body.contains("<script>alert"), "{}", p.body);
    let p = b.get("/admin/accounts/nobody").await;
    assert_eq!(p.status, 404, "{}", p.body);

    // The account page: balance, breakdown, grants, both holds, entries.
    let p = b.get("/admin/accounts/u-alpha").await;
    assert_eq!(p.status, 200);
    p.assert_secure_headers();
    assert_eq!(num(&p.text_of("available")), 1_000 - 100 - 150);
    assert_eq!(num(&p.text_of("held")), 100);
    assert!(
        p.body.contains(&open) && p.body.contains(&done),
        "{}",
        p.body
    );
    assert_eq!(p.body.matches("/actions/release").count(), 1, "{}", p.body);
    assert_eq!(p.body.matches("/actions/refund").count(), 1, "{}", p.body);
    let p = b.get("/admin/accounts/u-alpha?kind=commit").await;
    let entries = p.body[p.body.find("id=\"entries\"").unwrap()..].to_owned();
    assert_eq!(entries.matches("<td>commit</td>").count(), 1, "{entries}");
    assert!(!entries.contains("<td>grant</td>"), "{entries}");
    let p = b.get("/admin/accounts/u-alpha?since=not-a-date").await;
    assert_eq!(p.status, 400);

    // Grant 50 with a reason holding markup: confirmation, applied once though sent twice.
    let entries_before = entry_count(&app, "u-alpha").await;
    let xss = "<script>alert('x')</script> goodwill";
    let (review, done_p) = b
        .act(
            "u-alpha",
            "grant",
            &[
                ("amount", "50"),
                ("source", "promotion"),
                ("expires", ""),
                ("reason", xss),
            ],
        )
        .await;
    assert!(
        review.body.contains("Grant <strong>50</strong> credits"),
        "{}",
        review.body
    );
    assert!(!review.body.contains("<script>alert"), "{}", review.body);
    assert_eq!(
        (done_p.status, done_p.location()),
        (303, "/admin/accounts/u-alpha?done=grant")
    );
    assert_eq!(balance(&app, "u-alpha").await.available, 800);
    assert_eq!(entry_count(&app, "u-alpha").await, entries_before + 1);
    let p = b.get("/admin/accounts/u-alpha?done=grant").await;
    assert!(p.body.contains("Granted."), "{}", p.body);
    assert_eq!(num(&p.text_of("available")), 800);
    assert!(
        p.body.contains("&lt;script&gt;alert"),
        "the new entry, escaped: {}",
        p.body
    );
    assert!(!p.body.contains("<script>alert"), "{}", p.body);

    // The same confirmed form again (a double click, a reload): applied once.
    let csrf = p.field("csrf");
    let key = format!("console-{}", uuid::Uuid::new_v4().simple());
    let form = [
        ("csrf", csrf.as_str()),
        ("key", key.as_str()),
        ("step", "confirm"),
        ("amount", "7"),
        ("source", "promotion"),
        ("reason", "twice"),
    ];
    let first = b.post("/admin/accounts/u-alpha/actions/grant", &form).await;
    let second = b.post("/admin/accounts/u-alpha/actions/grant", &form).await;
    assert_eq!(first.location(), "/admin/accounts/u-alpha?done=grant");
    assert_eq!(second.location(), "/admin/accounts/u-alpha?done=replayed");
    assert_eq!(balance(&app, "u-alpha").await.available, 807);

    // Two confirmations of one form at once, on an account that does not exist yet (the cold
    // path: no account, no idempotency record), 20 rounds: one grant each time.
    for round in 0..20 {
        let account = format!("race-{round}");
        let key = format!("console-race-{round}-{}", uuid::Uuid::new_v4().simple());
        let form = [
            ("csrf", csrf.as_str()),
            ("key", key.as_str()),
            ("step", "confirm"),
            ("amount", "25"),
            ("source", "promotion"),
            ("reason", "race"),
        ];
        let path = format!("/admin/accounts/{account}/actions/grant");
        let mut two = Browser::new(&app);
        two.cookies.clone_from(&b.cookies);
        let (x, y) = tokio::join!(b.post(&path, &form), two.post(&path, &form));
        let mut outcomes = [x.location().to_owned(), y.location().to_owned()];
        outcomes.sort();
        assert_eq!(
            outcomes,
            [
                format!("/admin/accounts/{account}?done=grant"),
                format!("/admin/accounts/{account}?done=replayed")
            ],
            "round {round}"
        );
        assert_eq!(balance(&app, &account).await.available, 25, "round {round}");
        assert_eq!(entry_count(&app, &account).await, 1, "round {round}");
    }

    // Without the CSRF token, or with another session's: 403 and nothing written.
    let n = entry_count(&app, "u-alpha").await;
    let p = b
        .post(
            "/admin/accounts/u-alpha/actions/grant",
            &[
                ("key", "console-nocsrf"),
                ("step", "confirm"),
                ("amount", "50"),
                ("source", "promotion"),
                ("reason", "forged"),
            ],
        )
        .await;
    assert_eq!(p.status, 403, "{}", p.body);
    p.assert_secure_headers();
    let p = b
        .post(
            "/admin/accounts/u-alpha/actions/adjust",
            &[
                ("csrf", "forged-token"),
                ("key", "console-forged"),
                ("step", "confirm"),
                ("delta", "-500"),
                ("reason", "forged"),
            ],
        )
        .await;
    assert_eq!(p.status, 403, "{}", p.body);
    assert_eq!(entry_count(&app, "u-alpha").await, n);
    assert_eq!(balance(&app, "u-alpha").await.available, 807);

    // A reason is required; a bad amount is a clear error; neither writes.
    let (p, _) = b
        .act(
            "u-alpha",
            "grant",
            &[("amount", "50"), ("source", "promotion"), ("reason", " ")],
        )
        .await;
    assert_eq!(p.status, 400, "{}", p.body);
    assert!(p.body.contains("reason: is required"), "{}", p.body);
    let (p, _) = b
        .act(
            "u-alpha",
            "grant",
            &[("amount", "lots"), ("source", "promotion"), ("reason", "x")],
        )
        .await;
    assert_eq!(p.status, 400, "{}", p.body);
    assert!(p.body.contains("amount"), "{}", p.body);
    let (p, _) = b
        .act(
            "u-alpha",
            "grant",
            &[("amount", "5"), ("source", "purchase"), ("reason", "x")],
        )
        .await;
    assert_eq!(p.status, 400, "{}", p.body);
    assert_eq!(entry_count(&app, "u-alpha").await, n);

    // Adjust: the operator recorded is the signed-in caller.
    let (_, p) = b
        .act(
            "u-alpha",
            "adjust",
            &[("delta", "-7"), ("reason", "double grant")],
        )
        .await;
    assert_eq!(
        p.location(),
        "/admin/accounts/u-alpha?done=adjust",
        "{}",
        p.body
    );
    assert_eq!(balance(&app, "u-alpha").await.available, 800);
    let p = b.get("/admin/accounts/u-alpha?kind=adjustment").await;
    assert!(p.body.contains("double grant (by support)"), "{}", p.body);

    // Set plan.
    let (_, p) = b
        .act(
            "u-alpha",
            "set_plan",
            &[("plan", "pro"), ("reason", "upgrade by support")],
        )
        .await;
    assert_eq!(
        p.location(),
        "/admin/accounts/u-alpha?done=set_plan",
        "{}",
        p.body
    );
    assert_eq!(balance(&app, "u-alpha").await.plan, "pro");
    let (p, _) = b
        .act("u-alpha", "set_plan", &[("plan", "nope"), ("reason", "x")])
        .await;
    assert_eq!(p.status, 400);

    // Transfer.
    let (_, p) = b
        .act(
            "u-alpha",
            "transfer",
            &[("to", "u-beta"), ("amount", "40"), ("reason", "merge")],
        )
        .await;
    assert_eq!(
        p.location(),
        "/admin/accounts/u-alpha?done=transfer",
        "{}",
        p.body
    );
    assert_eq!(balance(&app, "u-beta").await.available, 50);
    assert_eq!(balance(&app, "u-alpha").await.available, 760);

    // Release the open hold; refund 30 of the committed one.
    let (_, p) = b
        .act(
            "u-alpha",
            "release",
            &[("hold_id", &open), ("reason", "stuck job")],
        )
        .await;
    assert_eq!(
        p.location(),
        "/admin/accounts/u-alpha?done=release",
        "{}",
        p.body
    );
    let now = balance(&app, "u-alpha").await;
    assert_eq!((now.available, now.held), (860, 0));
    let (_, p) = b
        .act(
            "u-alpha",
            "refund",
            &[
                ("hold_id", &done),
                ("amount", "30"),
                ("reason", "bad render"),
            ],
        )
        .await;
    assert_eq!(
        p.location(),
        "/admin/accounts/u-alpha?done=refund",
        "{}",
        p.body
    );
    assert_eq!(balance(&app, "u-alpha").await.available, 890);
    // Release is for open holds only: the committed one is refused, unchanged.
    let (p, _) = b
        .act(
            "u-alpha",
            "release",
            &[("hold_id", &done), ("reason", "wrong button")],
        )
        .await;
    assert_eq!(p.status, 409, "{}", p.body);
    assert_eq!(balance(&app, "u-alpha").await.available, 890);
    // A hold of another account cannot be moved through this one's page.
    let theirs = reserve(&app, "u-beta", 5).await;
    let (p, _) = b
        .act(
            "u-alpha",
            "release",
            &[("hold_id", &theirs), ("reason", "x")],
        )
        .await;
    assert_eq!(p.status, 400, "{}", p.body);
    assert_eq!(balance(&app, "u-beta").await.held, 5);

    // A paid Checkout (the Stripe log and the dashboard show it).
    let body = crate::stripe::tally_session_event(
        "evt_console_1",
        "checkout.session.completed",
        "cs_console_1",
        "paid",
    );
    assert_eq!(app.post_webhook(&body).await.0, 200);

    // The dashboard: 30 daily points per chart, today's usage = 150 charged − 30 refunded.
    let p = b.get("/admin/dashboard").await;
    assert_eq!(p.status, 200, "{}", p.body);
    p.assert_secure_headers();
    assert_eq!(
        p.body.matches("data-points=\"30\"").count(),
        3,
        "usage, one operation, purchases: {}",
        p.body
    );
    assert_eq!(num(&p.text_of("total-used")), 120);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert!(
        p.body
            .contains(&format!("data-day=\"{today}\" data-value=\"120\"")),
        "{}",
        p.body
    );
    let csv = b.get("/admin/dashboard.csv?table=usage").await;
    assert_eq!(csv.status, 200);
    assert_eq!(
        csv.body,
        format!("day,operation,credits,jobs\n{today},,120,1\n")
    );
    let csv = b.get("/admin/dashboard.csv?table=top").await;
    assert_eq!(csv.body, "account_id,credits_used\nu-alpha,120\n");
    let csv = b.get("/admin/dashboard.csv?table=purchases").await;
    assert_eq!(
        csv.body,
        format!("day,pack,purchases,credits,paid_minor_units\n{today},Starter pack,1,500,1900\n")
    );
    assert!(p.body.contains("<td>Starter pack</td>"), "{}", p.body);
    assert_eq!(b.get("/admin/dashboard.csv?table=nope").await.status, 400);

    // The Stripe log: a paid Checkout appears with its business key; reconciliation runs.
    let p = b.get("/admin/stripe").await;
    assert_eq!(p.status, 200);
    p.assert_secure_headers();
    assert!(
        p.body.contains("evt_console_1") && p.body.contains("checkout_session:cs_console_1"),
        "{}",
        p.body
    );
    assert!(p.body.contains("checkout.session.completed"), "{}", p.body);
    let csrf = p.field("csrf");
    let r = b.post("/admin/reconcile", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303);
    let p = b.get("/admin/stripe").await;
    assert!(
        p.text_of("audit-status").starts_with("All reconciled"),
        "{}",
        p.body
    );
    assert_eq!(b.post("/admin/reconcile", &[]).await.status, 403);
    // The purchase shows on the buyer's page.
    let p = b.get("/admin/accounts/buyer").await;
    assert!(
        p.body.contains("checkout_session:cs_console_1"),
        "{}",
        p.body
    );

    // A tenant-limited admin sees its accounts only, and no cross-account page.
    let mut t = Browser::new(&app);
    assert_eq!(t.sign_in(TENANT).await.status, 303);
    assert_eq!(t.get("/admin/accounts/u-alpha").await.status, 403);
    assert_eq!(t.get("/admin/dashboard").await.status, 403);
    assert_eq!(t.get("/admin/stripe").await.status, 403);
    let p = t.get("/admin/accounts").await;
    assert!(!p.body.contains("u-alpha"), "{}", p.body);

    // Over TLS (a proxy says so), the cookie is Secure.
    let mut s = Browser::new(&app);
    let form = s.get("/admin/login").await;
    let csrf = form.field("csrf");
    let resp = s
        .http
        .post(format!("{}/admin/login", s.base))
        .header("cookie", s.cookie_header())
        .header("x-forwarded-proto", "https")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN}&csrf={csrf}"))
        .send()
        .await
        .unwrap();
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("; Secure"), "{set}");

    // Sign-out clears the cookie; the pages send to sign-in again.
    let p = b.get("/admin/accounts").await;
    let csrf = p.field("csrf");
    let out = b.post("/admin/logout", &[("csrf", &csrf)]).await;
    assert_eq!((out.status, out.location()), (303, "/admin/login"));
    assert!(!b.cookies.contains_key("tally_admin"));
    assert_eq!(b.get("/admin/accounts").await.location(), "/admin/login");

    app.finish().await;
}

/// A session ends at its expiry; a tampered cookie is no session.
async fn sessions_expire(backend: Backend) {
    let app = console_app(backend, Duration::from_secs(1)).await;
    let mut b = Browser::new(&app);
    assert_eq!(b.sign_in(ADMIN).await.status, 303);
    assert_eq!(b.get("/admin/accounts").await.status, 200);
    let cookie = b.cookies["tally_admin"].clone();
    // Another subject under the same MAC: refused.
    let mut parts: Vec<&str> = cookie.split('.').collect();
    let forged_subject = "0".repeat(32);
    parts[1] = &forged_subject;
    b.cookies.insert("tally_admin".into(), parts.join("."));
    assert_eq!(b.get("/admin/accounts").await.location(), "/admin/login");
    b.cookies.insert("tally_admin".into(), cookie);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let p = b.get("/admin/accounts").await;
    assert_eq!((p.status, p.location()), (303, "/admin/login"));
    app.finish().await;
}

/// Off unless enabled.
async fn off_by_default(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut b = Browser::new(&app);
    assert_eq!(b.get("/admin/login").await.status, 404);
    assert_eq!(b.get("/admin/accounts").await.status, 404);
    app.finish().await;
}

crate::on_both_backends!(pages_and_actions, sessions_expire, off_by_default);
