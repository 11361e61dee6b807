/* LD_PRELOAD shim for the tests' Orthanc: Orthanc 1.10 has no option to choose the address its DICOM port
 * listens on (it binds every interface), and our servers bind loopback only. Any bind() to the wildcard
 * address becomes a bind() to 127.0.0.1 (or ::1). Built by tests/orthanc_support.py with the C compiler. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *address, socklen_t length) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (address && address->sa_family == AF_INET && length >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in loopback;
        memcpy(&loopback, address, sizeof loopback);
        if (loopback.sin_addr.s_addr == htonl(INADDR_ANY)) loopback.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real_bind(fd, (const struct sockaddr *)&loopback, sizeof loopback);
    }
    if (address && address->sa_family == AF_INET6 && length >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 loopback;
        memcpy(&loopback, address, sizeof loopback);
        if (!memcmp(&loopback.sin6_addr, &in6addr_any, sizeof in6addr_any)) loopback.sin6_addr = in6addr_loopback;
        return real_bind(fd, (const struct sockaddr *)&loopback, sizeof loopback);
    }
    return real_bind(fd, address, length);
}
