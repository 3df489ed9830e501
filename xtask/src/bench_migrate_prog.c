/*
 * The test program of `cargo xtask bench migrate`, built with `gcc -static -O2` at bench time.
 *
 *   prog serve SIZE_MIB RATE_MIB_S
 *     Allocates SIZE_MIB MiB, touches all of it, then rewrites RATE_MIB_S MiB of it per second (whole
 *     pages, a little every millisecond, on a writer thread) and answers HTTP on port 80 (on the
 *     main thread, so a writer stalled by missing pages does not hold the answers) with its
 *     counters:
 *       seq=N maxgap_us=G wallgap_us=W net=net:[INODE] rewritten_mib=M
 *     maxgap_us is the longest gap between two of the writer's iterations since start or since the last
 *     `GET /reset` (its own view of a pause: a freeze, a dump, the move) on CLOCK_MONOTONIC, which
 *     CRIU restores inside a time namespace whose offset hides the time between dump and restore;
 *     wallgap_us is the same on CLOCK_REALTIME, which nothing hides. net names the network
 *     namespace it runs in, which changes when it is restored on another node.
 *
 *   prog client new|keepalive IP PORT INTERVAL_MS MAX_SECONDS
 *     new: opens a new connection to IP:PORT every INTERVAL_MS (without waiting for earlier ones,
 *     each given 1 s) and sends `GET /` (HTTP/1.0). keepalive: one HTTP/1.1 connection, a request
 *     every INTERVAL_MS once the previous one was answered (a new connection if it breaks).
 *     Prints one line per request on stdout:
 *       START_US END_US ok BODY       or      START_US END_US fail REASON
 *     (CLOCK_MONOTONIC microseconds, the same clock in every network namespace). Stops on SIGTERM,
 *     SIGINT or after MAX_SECONDS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MAX_CLIENTS 64
#define MAX_INFLIGHT 1000

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
	(void)sig;
	stop = 1;
}

static int64_t wall_us(void) {
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t now_us(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* ---- serve ---- */

struct conn {
	int fd;
	size_t len;
	char buf[1024];
};

/* What the writer thread measures and the server reports. */
static _Atomic int64_t maxgap_us, wallgap_us;
static _Atomic uint64_t rewritten;
static _Atomic int reset_requested;

struct writer_args {
	unsigned char *mem;
	size_t pages;
	long rate_mib;
};

/* Rewrites rate_mib MiB/s in whole pages, a little every millisecond, cycling through the region,
 * and keeps the longest gap between two of its iterations (its own view of a pause). A pause puts
 * it behind: it catches up at once, as a writer with a quota would. */
static void *writer(void *arg) {
	struct writer_args *w = arg;
	uint64_t generation = 0;
	size_t next_page = 0;
	double owed_pages = 0;
	double pages_per_us = (double)w->rate_mib * 256.0 / 1e6;
	int64_t last = now_us(), last_wall = wall_us();
	for (;;) {
		struct timespec ms = {.tv_sec = 0, .tv_nsec = 1000000};
		nanosleep(&ms, NULL);
		int64_t t = now_us();
		int64_t gap = t - last;
		last = t;
		int64_t wt = wall_us();
		int64_t wgap = wt - last_wall;
		last_wall = wt;
		if (atomic_exchange(&reset_requested, 0)) {
			maxgap_us = 0;
			wallgap_us = 0;
		}
		if (gap > maxgap_us)
			maxgap_us = gap;
		if (wgap > wallgap_us)
			wallgap_us = wgap;
		owed_pages += (double)gap * pages_per_us;
		while (owed_pages >= 1.0 && w->pages > 0) {
			unsigned char *page = w->mem + next_page * PAGE;
			memset(page, (int)(generation & 0xff), 64);
			memcpy(page + 64, &generation, 8);
			for (size_t off = 72; off < PAGE; off += 8)
				page[off] ^= (unsigned char)(generation + off);
			next_page++;
			if (next_page == w->pages) {
				next_page = 0;
				generation++;
			}
			owed_pages -= 1.0;
			rewritten++;
		}
	}
	return NULL;
}

/* Answers HTTP on its own thread, as a service's request path would beside its background work:
 * what the client sees is the service, the writer's pauses are the program's own column. */
static int serve(long size_mib, long rate_mib) {
	size_t size = (size_t)size_mib << 20;
	size_t pages = size / PAGE;
	unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	/* Every page gets contents of its own, so no two pages (and no page and zero) look alike. */
	uint64_t x = 0x9e3779b97f4a7c15ULL;
	for (size_t i = 0; i < size; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(mem + i, &x, 8);
	}

	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(80)};
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 128) < 0) {
		perror("listen :80");
		return 1;
	}
	nonblock(lfd);
	static struct writer_args wargs;
	wargs = (struct writer_args){.mem = mem, .pages = pages, .rate_mib = rate_mib};
	pthread_t tid;
	if (pthread_create(&tid, NULL, writer, &wargs) != 0) {
		perror("pthread_create");
		return 1;
	}
	fprintf(stderr, "serving: %ld MiB resident, rewriting %ld MiB/s\n", size_mib, rate_mib);

	struct conn conns[MAX_CLIENTS];
	int nconns = 0;
	uint64_t seq = 0;

	for (;;) {
		struct pollfd pfd[MAX_CLIENTS + 1];
		pfd[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
		for (int i = 0; i < nconns; i++)
			pfd[i + 1] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
		poll(pfd, nconns + 1, 100);

		if (pfd[0].revents & POLLIN) {
			for (;;) {
				int fd = accept(lfd, NULL, NULL);
				if (fd < 0)
					break;
				if (nconns == MAX_CLIENTS) {
					close(fd);
					continue;
				}
				nonblock(fd);
				conns[nconns].fd = fd;
				conns[nconns].len = 0;
				nconns++;
			}
		}
		for (int i = 0; i < nconns; i++) {
			struct conn *c = &conns[i];
			ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
			if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				continue;
			int done = n <= 0;
			if (n > 0) {
				c->len += (size_t)n;
				c->buf[c->len] = 0;
				if (strstr(c->buf, "\r\n\r\n") || strstr(c->buf, "\n\n") ||
				    c->len == sizeof c->buf - 1) {
					if (strncmp(c->buf, "GET /reset", 10) == 0)
						reset_requested = 1;
					char net[64] = "?";
					ssize_t l = readlink("/proc/self/ns/net", net, sizeof net - 1);
					if (l > 0)
						net[l] = 0;
					char body[256];
					int blen = snprintf(body, sizeof body,
					                    "seq=%llu maxgap_us=%lld wallgap_us=%lld net=%s "
					                    "rewritten_mib=%.1f\n",
					                    (unsigned long long)++seq, (long long)maxgap_us,
					                    (long long)wallgap_us, net,
					                    (double)rewritten / 256.0);
					int keep = strstr(c->buf, "HTTP/1.1") != NULL &&
					           strstr(c->buf, "Connection: close") == NULL;
					char resp[512];
					int rlen = snprintf(resp, sizeof resp,
					                    "HTTP/1.%d 200 OK\r\nContent-Type: text/plain\r\n"
					                    "Content-Length: %d\r\n%s\r\n%s",
					                    keep, blen, keep ? "" : "Connection: close\r\n", body);
					if (write(c->fd, resp, (size_t)rlen) < 0)
						keep = 0;
					/* One request at a time per connection: a client that pipelines waits. */
					c->len = 0;
					done = !keep;
				}
			}
			if (done) {
				close(c->fd);
				conns[i] = conns[--nconns];
				i--;
			}
		}
	}
}

/* ---- client ---- */

struct attempt {
	int fd;
	int sent;
	int64_t start;
	size_t len;
	char buf[512];
};

static void report(struct attempt *a, const char *what, const char *detail) {
	int64_t end = now_us();
	printf("%lld %lld %s %s\n", (long long)a->start, (long long)end, what, detail);
	close(a->fd);
	a->fd = -1;
}

/* The body of a complete HTTP response in buf (NUL-terminated), or NULL while incomplete. */
static char *response_body(char *buf, size_t len) {
	char *body = strstr(buf, "\r\n\r\n");
	if (!body)
		return NULL;
	body += 4;
	char *cl = strcasestr(buf, "Content-Length:");
	if (cl && cl < body && (size_t)(body - buf) + (size_t)atol(cl + 15) > len)
		return NULL;
	body[strcspn(body, "\r\n")] = 0;
	return body;
}

/* One HTTP/1.1 connection, one request per tick once the previous one was answered. */
static int client_keepalive(struct sockaddr_in *addr, int interval_ms, int max_s) {
	const char req[] = "GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
	struct attempt a = {.fd = -1};
	int64_t begin = now_us(), next = begin;
	while (!stop && now_us() - begin < (int64_t)max_s * 1000000) {
		int64_t t = now_us();
		if (a.fd < 0) {
			a.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
			a.sent = 0;
			a.len = 0;
			a.start = t;
			if (connect(a.fd, (struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS) {
				report(&a, "fail", strerror(errno));
				usleep((useconds_t)interval_ms * 1000);
				continue;
			}
			struct pollfd p = {.fd = a.fd, .events = POLLOUT};
			if (poll(&p, 1, 1000) != 1) {
				report(&a, "fail", "connect timeout");
				continue;
			}
			int err = 0;
			socklen_t el = sizeof err;
			getsockopt(a.fd, SOL_SOCKET, SO_ERROR, &err, &el);
			if (err) {
				report(&a, "fail", strerror(err));
				usleep((useconds_t)interval_ms * 1000);
				continue;
			}
			int one = 1;
			setsockopt(a.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		}
		if (!a.sent) {
			if (t < next) {
				usleep((useconds_t)(next - t));
				continue;
			}
			next = t + (int64_t)interval_ms * 1000;
			a.start = now_us();
			a.len = 0;
			if (write(a.fd, req, sizeof req - 1) < 0) {
				report(&a, "fail", strerror(errno));
				continue;
			}
			a.sent = 1;
		}
		struct pollfd p = {.fd = a.fd, .events = POLLIN};
		if (poll(&p, 1, 50) <= 0)
			continue;
		ssize_t r = read(a.fd, a.buf + a.len, sizeof a.buf - 1 - a.len);
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			continue;
		if (r <= 0) {
			report(&a, "fail", r < 0 ? strerror(errno) : "closed");
			continue;
		}
		a.len += (size_t)r;
		a.buf[a.len] = 0;
		char *body = response_body(a.buf, a.len);
		if (!body && a.len < sizeof a.buf - 1)
			continue;
		printf("%lld %lld ok %s\n", (long long)a.start, (long long)now_us(), body ? body : "?");
		a.sent = 0;
	}
	if (a.fd >= 0 && a.sent)
		report(&a, "fail", "stopped");
	fflush(stdout);
	return 0;
}

static int client(const char *kind, const char *ip, int port, int interval_ms, int max_s) {
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", ip);
		return 2;
	}
	if (strcmp(kind, "keepalive") == 0)
		return client_keepalive(&addr, interval_ms, max_s);
	static struct attempt at[MAX_INFLIGHT];
	for (int i = 0; i < MAX_INFLIGHT; i++)
		at[i].fd = -1;
	const char req[] = "GET / HTTP/1.0\r\n\r\n";
	int64_t begin = now_us(), next = begin;
	while (!stop && now_us() - begin < (int64_t)max_s * 1000000) {
		int64_t t = now_us();
		if (t >= next) {
			next += (int64_t)interval_ms * 1000;
			if (next < t)
				next = t + (int64_t)interval_ms * 1000;
			int slot = -1;
			for (int i = 0; i < MAX_INFLIGHT; i++)
				if (at[i].fd < 0) {
					slot = i;
					break;
				}
			if (slot >= 0) {
				struct attempt *a = &at[slot];
				a->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
				a->sent = 0;
				a->len = 0;
				a->start = t;
				if (connect(a->fd, (struct sockaddr *)&addr, sizeof addr) < 0 &&
				    errno != EINPROGRESS)
					report(a, "fail", strerror(errno));
			}
		}
		struct pollfd pfd[MAX_INFLIGHT];
		int idx[MAX_INFLIGHT], n = 0;
		for (int i = 0; i < MAX_INFLIGHT; i++) {
			if (at[i].fd < 0)
				continue;
			if (t - at[i].start > 1000000) {
				report(&at[i], "fail", "timeout");
				continue;
			}
			pfd[n] = (struct pollfd){.fd = at[i].fd, .events = at[i].sent ? POLLIN : POLLOUT};
			idx[n++] = i;
		}
		int wait_ms = (int)((next - now_us()) / 1000);
		if (wait_ms < 0)
			wait_ms = 0;
		poll(pfd, n, wait_ms);
		for (int k = 0; k < n; k++) {
			struct attempt *a = &at[idx[k]];
			if (!pfd[k].revents)
				continue;
			if (!a->sent) {
				int err = 0;
				socklen_t el = sizeof err;
				getsockopt(a->fd, SOL_SOCKET, SO_ERROR, &err, &el);
				if (err) {
					report(a, "fail", strerror(err));
					continue;
				}
				if (write(a->fd, req, sizeof req - 1) < 0) {
					report(a, "fail", strerror(errno));
					continue;
				}
				a->sent = 1;
				continue;
			}
			ssize_t r = read(a->fd, a->buf + a->len, sizeof a->buf - 1 - a->len);
			if (r > 0) {
				a->len += (size_t)r;
				if (a->len < sizeof a->buf - 1)
					continue;
			}
			if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				continue;
			a->buf[a->len] = 0;
			char *body = strstr(a->buf, "\r\n\r\n");
			if (r < 0 || !body) {
				report(a, "fail", r < 0 ? strerror(errno) : "no body");
				continue;
			}
			body += 4;
			body[strcspn(body, "\r\n")] = 0;
			report(a, "ok", body);
		}
	}
	for (int i = 0; i < MAX_INFLIGHT; i++)
		if (at[i].fd >= 0)
			report(&at[i], "fail", "stopped");
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv) {
	/* Line by line: the bench watches the client's answers as they come. */
	setvbuf(stdout, NULL, _IOLBF, 1 << 16);
	if (argc == 4 && strcmp(argv[1], "serve") == 0)
		return serve(atol(argv[2]), atol(argv[3]));
	if (argc == 7 && strcmp(argv[1], "client") == 0)
		return client(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
	fprintf(stderr,
	        "usage: %s serve SIZE_MIB RATE_MIB_S | "
	        "client new|keepalive IP PORT INTERVAL_MS MAX_SECONDS\n",
	        argv[0]);
	return 2;
}
