//! Canonical paths and `Host` checks (issue 16): what route a request gets and the exact
//! target the upstream sees, over real sockets, for plain HTTP and WebSocket upgrades.

use crate::common::*;

/// What wsbeat should do with a request target.
enum Expect {
    /// Route `admin` or `default`, and the target the upstream must receive.
    Route(&'static str, &'static str),
    /// `400` from wsbeat; the upstream is never asked.
    BadRequest,
}
use Expect::{BadRequest, Route};

const CASES: &[(&str, Expect)] = &[
    ("/admin/ws", Route("admin", "/admin/ws")),
    ("/%61dmin/ws", Route("admin", "/admin/ws")),
    ("/adm%69n/ws", Route("admin", "/admin/ws")),
    ("//admin/ws", Route("admin", "/admin/ws")),
    ("/admin//ws", Route("admin", "/admin/ws")),
    ("/./admin/./ws", Route("admin", "/admin/ws")),
    ("/x/../admin/ws", Route("admin", "/admin/ws")),
    ("/%2e%2e/admin/ws", Route("admin", "/admin/ws")),
    ("/%2E%2e/%2e/admin", Route("admin", "/admin")),
    ("/../../admin/ws", Route("admin", "/admin/ws")),
    ("/admin/ws/.", Route("admin", "/admin/ws/")),
    ("/admin/..", Route("default", "/")),
    ("/a/b/../c", Route("default", "/a/c")),
    ("/%41dmin/ws", Route("default", "/Admin/ws")),
    ("/admin/%7e/~/%7E", Route("admin", "/admin/~/~/~")),
    ("/admin/%3a%3A", Route("admin", "/admin/%3A%3A")),
    ("/a%20b/%c3%a9", Route("default", "/a%20b/%C3%A9")),
    // The query is never touched, a `%2F` or dot segment in it included.
    (
        "/%61dmin/ws?next=%2Fhome&p=a/../b",
        Route("admin", "/admin/ws?next=%2Fhome&p=a/../b"),
    ),
    ("/q?x=%2f%5C", Route("default", "/q?x=%2f%5C")),
    ("/admin%2Fws", BadRequest),
    ("/admin%2fws", BadRequest),
    ("/admin/%5Cws", BadRequest),
    ("/admin/%5cws", BadRequest),
    ("/x\\..\\admin/ws", BadRequest),
    ("/admin/%00", BadRequest),
    ("/%C0%AE%C0%AE/admin", BadRequest),
    ("/admin/%c0%ae", BadRequest),
    ("/admin/%zz", BadRequest),
    ("/admin/%4", BadRequest),
    ("/admin/%FF", BadRequest),
];

/// wsbeat with route `admin` (`/admin`, its own upstream and a strict `allowed_origins`)
/// in front of two raw upstreams that answer every request with 403.
struct Setup {
    proxy: Proxy,
    admin: tokio::sync::mpsc::UnboundedReceiver<RawReceived>,
    default: tokio::sync::mpsc::UnboundedReceiver<RawReceived>,
}

async fn setup() -> Setup {
    let (default_addr, default) = raw_upstream(RawAnswer::Refuse).await;
    let (admin_addr, admin) = raw_upstream(RawAnswer::Refuse).await;
    let proxy = Proxy::start(default_addr, |c| {
        let yaml = format!(
            "routes: [{{ name: admin, path: /admin, upstream: {{ url: 'ws://{admin_addr}' }}, \
             allowed_origins: ['https://admin.example'] }}]"
        );
        c.routes = wsbeat::config::Config::from_yaml(&yaml, "t")
            .unwrap()
            .routes;
    })
    .await;
    Setup {
        proxy,
        admin,
        default,
    }
}

impl Setup {
    /// Sends `request`, and checks that it got `expect`: the route's upstream received
    /// the normalised target (and answered its 403), or wsbeat answered 400.
    async fn check(&mut self, request: &str, target: &str, expect: &Expect) {
        let response = raw_request(self.proxy.addr, request).await;
        match expect {
            BadRequest => {
                assert_eq!(response.status, 400, "{target}: {}", response.text());
                assert!(response.body.starts_with("wsbeat: "), "{}", response.body);
                assert_eq!(response.body.trim_end().lines().count(), 1);
            }
            Route(route, upstream_target) => {
                assert_eq!(response.status, 403, "{target}: {}", response.text());
                let received = match *route {
                    "admin" => next_received(&mut self.admin).await,
                    _ => next_received(&mut self.default).await,
                };
                let head = String::from_utf8_lossy(&received.head);
                let want = format!("GET {upstream_target} HTTP/1.1\r\n");
                assert!(head.starts_with(&want), "{target}: upstream saw {head}");
            }
        }
    }

    /// Nothing reached either upstream beyond what the cases expected.
    fn assert_no_stray_requests(&mut self) {
        assert!(self.admin.try_recv().is_err(), "a stray request to admin");
        assert!(
            self.default.try_recv().is_err(),
            "a stray request to default"
        );
    }
}

fn plain(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
}

#[tokio::test]
async fn routes_and_upstreams_see_the_canonical_path_on_plain_http() {
    let mut s = setup().await;
    for (target, expect) in CASES {
        s.check(&plain(target), target, expect).await;
    }
    s.assert_no_stray_requests();
}

#[tokio::test]
async fn routes_and_upstreams_see_the_canonical_path_on_websocket_handshakes() {
    let mut s = setup().await;
    for (target, expect) in CASES {
        s.check(&upgrade_request(target), target, expect).await;
    }
    s.assert_no_stray_requests();
    let rejected = CASES
        .iter()
        .filter(|(_, e)| matches!(e, BadRequest))
        .count() as f64;
    let admin = s.proxy.admin;
    let path = |route| async move {
        metric(
            admin,
            "wsbeat_handshakes_rejected_total",
            &[("route", route), ("reason", "path")],
        )
        .await
    };
    assert_eq!(path("admin").await + path("default").await, rejected);
}

#[tokio::test]
async fn an_encoded_path_no_longer_bypasses_a_routes_allowed_origins() {
    let mut s = setup().await;
    for target in ["/%61dmin/ws", "//admin/ws", "/x/../admin/ws"] {
        let request =
            upgrade_request(target).replace("\r\n\r\n", "\r\nOrigin: https://evil.example\r\n\r\n");
        let response = raw_request(s.proxy.addr, &request).await;
        assert_eq!(response.status, 403, "{target}: {}", response.text());
        assert!(
            response.body.contains("Origin"),
            "wsbeat's own 403: {}",
            response.body
        );
    }
    // The allowed origin still gets through, to the admin upstream.
    let request = upgrade_request("/%61dmin/ws")
        .replace("\r\n\r\n", "\r\nOrigin: https://admin.example\r\n\r\n");
    s.check(&request, "/%61dmin/ws", &Route("admin", "/admin/ws"))
        .await;
    s.assert_no_stray_requests();
    let origin = metric(
        s.proxy.admin,
        "wsbeat_handshakes_rejected_total",
        &[("route", "admin"), ("reason", "origin")],
    )
    .await;
    assert_eq!(origin, 3.0);
}

#[tokio::test]
async fn host_must_be_single_and_agree_with_an_absolute_target() {
    let mut s = setup().await;
    let with_host = |request: String, host: &str| request.replace("Host: test", host);
    // Same authority (case and default port aside): passes, as origin form upstream.
    for host in ["Host: test", "Host: TEST:80"] {
        for request in [
            plain("http://test/%61dmin/ws?a=%2F"),
            upgrade_request("http://test/%61dmin/ws?a=%2F"),
        ] {
            s.check(
                &with_host(request, host),
                host,
                &Route("admin", "/admin/ws?a=%2F"),
            )
            .await;
        }
    }
    let refused = [
        with_host(plain("http://test/admin/ws"), "Host: other"),
        with_host(upgrade_request("http://test/admin/ws"), "Host: other"),
        with_host(upgrade_request("http://test/admin/ws"), "Host: test:8080"),
        with_host(plain("/admin/ws"), "Host: test\r\nHost: test"),
        with_host(upgrade_request("/admin/ws"), "Host: test\r\nHost: other"),
    ];
    for request in &refused {
        s.check(request, request, &BadRequest).await;
    }
    s.assert_no_stray_requests();
    let bad_request = metric(
        s.proxy.admin,
        "wsbeat_handshakes_rejected_total",
        &[("route", "admin"), ("reason", "bad_request")],
    )
    .await;
    assert_eq!(bad_request, 3.0, "the three upgrades");
}

#[tokio::test]
async fn refused_handshakes_are_counted_by_reason() {
    let (addr, _received) = raw_upstream(RawAnswer::Accept).await;
    let proxy = Proxy::start(addr, |c| c.limits.max_connections = 1).await;
    let admin = proxy.admin;
    let count = |reason| async move {
        metric(
            admin,
            "wsbeat_handshakes_rejected_total",
            &[("route", "default"), ("reason", reason)],
        )
        .await
    };
    for reason in ["origin", "max_connections", "per_ip", "bad_request", "path"] {
        assert_eq!(count(reason).await, 0.0, "{reason} exported from start-up");
    }
    let _held = raw_websocket(proxy.addr, "/ws").await;
    let response = raw_request(proxy.addr, &upgrade_request("/ws")).await;
    assert_eq!(response.status, 503, "{}", response.text());
    let old_version = upgrade_request("/ws").replace("Version: 13", "Version: 8");
    assert_eq!(raw_request(proxy.addr, &old_version).await.status, 426);
    // A plain request with a bad path is refused too, but it is no handshake.
    assert_eq!(get(proxy.addr, "/a%2Fb").await.status, 400);
    assert_eq!(count("max_connections").await, 1.0);
    assert_eq!(count("bad_request").await, 1.0);
    assert_eq!(count("path").await, 0.0);
}
