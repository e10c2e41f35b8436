# volplane's image: the operator (`volplane run`) and the CSI node plugin (`volplane node`).
#
# Built by `make image` (hack/kind/kind.py image) with no pull and no network:
# BASE is a debootstrap root with Debian's python3 and the node plugin's tools
# (util-linux, mount, e2fsprogs, xfsprogs), imported into the local engine; the
# project and its pinned dependencies were installed from wheels outside the build
# into build/image/root/opt/volplane. .dockerignore admits nothing else.
ARG BASE
FROM ${BASE}
ARG SITE
COPY build/image/root/ /
ENV PYTHONPATH=${SITE} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/volplane/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m volplane version \
    && echo 'volplane:x:10001:10001::/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'volplane:x:10001:' >> /etc/group
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["python3", "-m", "volplane"]
CMD ["run"]
