"""The admin console in real headless Chromium: sign in, search, grant, adjust, release a hold,
the dashboard's chart, the Stripe page; a screenshot of each page."""

import datetime
import re

from playwright.sync_api import expect


def sign_in(page, server, token=None):
    page.goto(server.base + "/admin/login")
    page.fill("input[name=token]", token or server.admin_token)
    page.click("button:has-text('Sign in')")


def number(text):
    return int(text.replace(",", "").replace("\u2212", "-").strip())


def test_support_flow(page, server, shots):
    # Data a support person would meet: two customers, an open hold, a finished job.
    server.cli("account", "grant", "cust-ada", "1000", "--reason", "welcome")
    server.cli("account", "grant", "cust-bob", "20", "--reason", "welcome")
    out = server.cli("reserve", "cust-ada", "100", token=server.generation_token)
    open_hold = re.search(r"hold_[0-9a-f]{32}", out).group(0)
    out = server.cli("reserve", "cust-ada", "--operation", "video_export", "--param", "seconds=12",
                     "--param", "resolution=1080p", token=server.generation_token)
    job = re.search(r"hold_[0-9a-f]{32}", out).group(0)
    server.cli("commit", job, "30", token=server.generation_token)

    # A generation token does not sign in.
    sign_in(page, server, server.generation_token)
    expect(page.locator("p.error")).to_contain_text("lacks the admin role")

    sign_in(page, server)
    expect(page).to_have_url(server.base + "/admin/accounts")
    expect(page.locator("header .who")).to_contain_text("support")
    page.screenshot(path=str(shots / "accounts.png"), full_page=True)

    # Search by prefix.
    page.fill("input[name=q]", "cust-a")
    page.click("button:has-text('Search')")
    rows = page.locator("#accounts tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("cust-ada")
    page.click("#accounts a:has-text('cust-ada')")
    expect(page.locator("h1")).to_have_text("Account cust-ada")
    start = server.available("cust-ada")  # 1000 and the plan's sign-up bonus, less 100 + 30
    assert number(page.inner_text("#available")) == start
    expect(page.locator("#open-holds")).to_contain_text(open_hold)
    expect(page.locator("#committed-holds")).to_contain_text("operation=video_export")
    page.screenshot(path=str(shots / "account.png"), full_page=True)

    # Grant 50 with a reason (markup in it stays text): confirmation, then the balance and the
    # new entry.
    grant = page.locator("form.grant")
    grant.locator("input[name=amount]").fill("50")
    grant.locator("select[name=source]").select_option("promotion")
    grant.locator("input[name=reason]").fill("<b>sorry</b> for the outage")
    grant.locator("button[type=submit]").click()
    expect(page.locator("h1")).to_have_text("Confirm")
    expect(page.locator("p.confirm")).to_contain_text("Grant 50 credits to cust-ada")
    page.screenshot(path=str(shots / "confirm.png"), full_page=True)
    page.click("button:has-text('Confirm')")
    expect(page.locator("p.notice")).to_have_text("Granted.")
    assert number(page.inner_text("#available")) == start + 50 == server.available("cust-ada")
    newest = page.locator("#entries tbody tr").first
    expect(newest).to_contain_text("grant")
    expect(newest).to_contain_text("+50")
    expect(newest).to_contain_text("<b>sorry</b> for the outage")  # shown as text, not bold
    assert page.locator("#entries b").count() == 0

    # Adjust −20: recorded with the operator's name.
    page.click("summary:has-text('Adjust')")
    adjust = page.locator("form.adjust")
    adjust.locator("input[name=delta]").fill("-20")
    adjust.locator("input[name=reason]").fill("duplicate grant")
    adjust.locator("button[type=submit]").click()
    page.click("button:has-text('Confirm')")
    expect(page.locator("p.notice")).to_have_text("Adjusted.")
    assert number(page.inner_text("#available")) == start + 30
    expect(page.locator("#entries tbody tr").first).to_contain_text("duplicate grant (by support)")

    # Release the open hold.
    row = page.locator("#open-holds tbody tr", has_text=open_hold)
    row.locator("input[name=reason]").fill("job crashed")
    row.locator("button:has-text('Release')").click()
    expect(page.locator("p.confirm")).to_contain_text(open_hold)
    page.click("button:has-text('Confirm')")
    expect(page.locator("p.notice")).to_have_text("Hold released.")
    assert number(page.inner_text("#held")) == 0
    assert number(page.inner_text("#available")) == start + 130 == server.available("cust-ada")
    expect(page.locator("#open-holds")).to_contain_text("No open holds.")

    # Filter the entries by kind (the select submits itself through the vendored script).
    page.select_option("select[name=kind]", "release")
    expect(page).to_have_url(re.compile(r"kind=release"))
    expect(page.locator("#entries tbody tr")).to_have_count(1)

    # The dashboard: the usage chart has one bar per day of the window (30), today's = 30.
    page.click("nav a:has-text('Dashboard')")
    chart = page.locator("svg#usage")
    expect(chart).to_be_visible()
    expect(chart.locator("rect.bar")).to_have_count(30)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert chart.locator(f"rect.bar[data-day='{today}']").get_attribute("data-value") == "30"
    assert page.locator("svg#usage").bounding_box()["height"] > 50
    expect(page.locator("#operations")).to_contain_text("video_export")
    page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

    # The Stripe page and the reconciliation.
    page.click("nav a:has-text('Stripe')")
    page.click("button:has-text('Run now')")
    expect(page.locator("#audit-status")).to_contain_text("All reconciled")
    page.screenshot(path=str(shots / "stripe.png"), full_page=True)

    # Sign out: back to the sign-in form; the pages need a session again.
    page.click("button:has-text('Sign out')")
    expect(page).to_have_url(server.base + "/admin/login")
    page.goto(server.base + "/admin/accounts")
    expect(page).to_have_url(server.base + "/admin/login")
    page.screenshot(path=str(shots / "login.png"), full_page=True)


def test_reading_works_without_javascript(browser, server):
    ctx = browser.new_context(java_script_enabled=False)
    page = ctx.new_page()
    try:
        sign_in(page, server)
        expect(page).to_have_url(server.base + "/admin/accounts")
        page.goto(server.base + "/admin/dashboard")
        expect(page.locator("svg#usage rect.bar")).to_have_count(30)
        page.goto(server.base + "/admin/accounts?q=cust")
        expect(page.locator("#accounts tbody tr")).to_have_count(2)
    finally:
        ctx.close()
