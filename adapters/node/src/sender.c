/*
 * The one thing Node.js cannot do by itself: send a datagram on a Unix
 * (AF_UNIX, SOCK_DGRAM) socket. poolscope's agent names every sender by the
 * pid the kernel attaches to the datagram (SCM_CREDENTIALS), so the send must
 * happen in the application's own process: a helper process would be
 * reported instead of the application.
 *
 * Plain Node-API (C, no node-addon-api): the compiled module keeps working
 * across Node.js versions without a rebuild. Every function returns a
 * negative errno instead of throwing, so that the JavaScript side can drop a
 * message without try/catch around each call.
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define UNIX_PATH_BYTES sizeof(((struct sockaddr_un *)0)->sun_path)

static napi_value int_value(napi_env env, int v) {
  napi_value out = NULL;
  napi_create_int32(env, v, &out);
  return out;
}

/* Reads up to `n` arguments; missing ones are left undefined. */
static int get_args(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return -1;
  return (int)argc;
}

static int get_fd(napi_env env, napi_value v, int *fd) {
  int32_t out;
  if (napi_get_value_int32(env, v, &out) != napi_ok || out < 0) return -EBADF;
  *fd = out;
  return 0;
}

/* Fills a sockaddr_un from a JS string path; returns its length or -errno. */
static int get_addr(napi_env env, napi_value v, struct sockaddr_un *addr, socklen_t *len) {
  size_t n = 0;
  memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &n) != napi_ok) return -EINVAL;
  if (n == 0) return -ENOENT;
  if (n >= UNIX_PATH_BYTES) return -ENAMETOOLONG;
  if (napi_get_value_string_utf8(env, v, addr->sun_path, UNIX_PATH_BYTES, &n) != napi_ok)
    return -EINVAL;
  if (strlen(addr->sun_path) != n) return -EINVAL; /* embedded NUL */
  *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
  return 0;
}

/* socket() -> fd, non-blocking and close-on-exec, or -errno. */
static napi_value Socket(napi_env env, napi_callback_info info) {
  (void)info;
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  return int_value(env, fd < 0 ? -errno : fd);
}

/*
 * sendTo(fd, path, buffer) -> bytes sent or -errno. Never blocks
 * (MSG_DONTWAIT): a full receive queue is -EAGAIN, a missing agent -ENOENT
 * or -ECONNREFUSED, and the caller drops the message.
 */
static napi_value SendTo(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd, rc;
  struct sockaddr_un addr;
  socklen_t addr_len = 0;
  void *data = NULL;
  size_t len = 0;
  bool is_buffer = false;
  if (get_args(env, info, argv, 3) < 3) return int_value(env, -EINVAL);
  if ((rc = get_fd(env, argv[0], &fd)) < 0) return int_value(env, rc);
  if ((rc = get_addr(env, argv[1], &addr, &addr_len)) < 0) return int_value(env, rc);
  if (napi_is_buffer(env, argv[2], &is_buffer) != napi_ok || !is_buffer)
    return int_value(env, -EINVAL);
  if (napi_get_buffer_info(env, argv[2], &data, &len) != napi_ok) return int_value(env, -EINVAL);
  ssize_t n = sendto(fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&addr,
                     addr_len);
  return int_value(env, n < 0 ? -errno : (int)n);
}

/* close(fd) -> 0 or -errno. */
static napi_value Close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd, rc;
  if (get_args(env, info, argv, 1) < 1) return int_value(env, -EINVAL);
  if ((rc = get_fd(env, argv[0], &fd)) < 0) return int_value(env, rc);
  return int_value(env, close(fd) < 0 ? -errno : 0);
}

/*
 * For tests: bind(path) -> fd of a non-blocking receiving socket that asks
 * the kernel for each sender's credentials, as the agent does; or -errno.
 */
static napi_value Bind(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un addr;
  socklen_t addr_len = 0;
  int one = 1, rc;
  if (get_args(env, info, argv, 1) < 1) return int_value(env, -EINVAL);
  if ((rc = get_addr(env, argv[0], &addr, &addr_len)) < 0) return int_value(env, rc);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return int_value(env, -errno);
  if (bind(fd, (struct sockaddr *)&addr, addr_len) < 0 ||
      setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0) {
    int err = errno;
    close(fd);
    return int_value(env, -err);
  }
  return int_value(env, fd);
}

/*
 * For tests: recv(fd) -> { data: Buffer, pid, uid } for the next datagram,
 * null when there is none, or a negative errno.
 */
static napi_value Recv(napi_env env, napi_callback_info info) {
  napi_value argv[1], out = NULL, data, v;
  int fd, rc;
  char buf[65536];
  union {
    struct cmsghdr align;
    char bytes[CMSG_SPACE(sizeof(struct ucred))];
  } control;
  struct iovec iov = {buf, sizeof(buf)};
  struct msghdr msg;
  if (get_args(env, info, argv, 1) < 1) return int_value(env, -EINVAL);
  if ((rc = get_fd(env, argv[0], &fd)) < 0) return int_value(env, rc);
  memset(&msg, 0, sizeof(msg));
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.bytes;
  msg.msg_controllen = sizeof(control.bytes);
  ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_get_null(env, &out);
      return out;
    }
    return int_value(env, -errno);
  }
  int32_t pid = -1, uid = -1;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
      struct ucred cred;
      memcpy(&cred, CMSG_DATA(c), sizeof(cred));
      pid = cred.pid;
      uid = (int32_t)cred.uid;
    }
  }
  if (napi_create_object(env, &out) != napi_ok) return int_value(env, -ENOMEM);
  if (napi_create_buffer_copy(env, (size_t)n, buf, NULL, &data) != napi_ok)
    return int_value(env, -ENOMEM);
  napi_set_named_property(env, out, "data", data);
  napi_create_int32(env, pid, &v);
  napi_set_named_property(env, out, "pid", v);
  napi_create_int32(env, uid, &v);
  napi_set_named_property(env, out, "uid", v);
  return out;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
      {"socket", NULL, Socket, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sendTo", NULL, SendTo, NULL, NULL, NULL, napi_enumerable, NULL},
      {"close", NULL, Close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"bind", NULL, Bind, NULL, NULL, NULL, napi_enumerable, NULL},
      {"recv", NULL, Recv, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props) != napi_ok)
    return NULL;
  return exports;
}
